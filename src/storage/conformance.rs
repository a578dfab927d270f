//! A conformance suite for [`Store`] implementations: for applications that
//! bring their own storage, a way to check it keeps the contract of the
//! trait (see [`Store`]'s methods and SPEC.md, "The `Store` contract") the
//! way [`MemoryStore`](super::MemoryStore), the reference, and the SQLite
//! store do.
//!
//! [`run`] runs every check in [`CHECKS`], each on a fresh store from the
//! closure it is given (driven by [`crate::client::block_on`];
//! [`try_run_async`] runs them on any executor, for a store whose futures
//! need one), and panics with a message naming each check that
//! failed and why ("store conformance: commit_send: ..."); [`try_run`]
//! returns the [`Violation`]s instead. Each check is also a function of its
//! own (`check_*`), for running one at a time.
//!
//! ```
//! use cubbyhole::storage::MemoryStore;
//!
//! cubbyhole::storage::conformance::run(MemoryStore::new);
//! ```
//!
//! In a test of your own store:
//!
//! ```
//! # use cubbyhole::storage::MemoryStore as MyStore;
//! use cubbyhole::storage::conformance;
//!
//! // Everything:
//! if let Err(violations) = conformance::try_run(MyStore::new) {
//!     for v in &violations {
//!         eprintln!("{v}");
//!     }
//!     panic!("{} checks failed", violations.len());
//! }
//! // One check, on a store made here (the checks are async: a store's
//! // futures may need the application's executor, a browser's say):
//! cubbyhole::client::block_on(conformance::check_commit_send(&mut MyStore::new())).unwrap();
//! ```
//!
//! # What is checked
//!
//! Every check starts from an empty store (the `empty` check verifies that
//! the closure makes one) and drives it through the trait only, with real
//! protocol objects: an identity key pair, prekeys, sessions initiated from
//! verified bundles. Before storing session records a check stores the
//! identity, as a client does: a store that serializes sessions restores
//! them with it. The checks, by name (see each `check_*` function):
//!
//! | name | contract |
//! |---|---|
//! | `empty` | a new store holds nothing; deleting or pruning nothing succeeds |
//! | `identity` | [`Store::set_identity`] / [`Store::identity`] round trip |
//! | `prekeys` | [`PrekeyState`] round trips, every field (`accepted` included); a second set replaces it |
//! | `sessions` | session records round trip through [`Store::session`] and [`Store::sessions`]: entries, flags, generations, times, encoding |
//! | `remove_session` | removes one peer's record, nothing else |
//! | `quarantine` | [`Store::quarantine_session`] moves the record to [`Store::quarantined`] (oldest first); no record: nothing happens |
//! | `peers` | peer records: replace by address, [`Store::peers`], [`Store::peers_with_identity`] |
//! | `contacts` | contact records: round trip, replace by name, [`Store::contacts`] |
//! | `access_keys` | the own access key and the peers' keys and exclusions round trip; a peer's key and its exclusion are written without touching each other |
//! | `commit_send` | the session record, the outbox entry and the sent message are all stored |
//! | `commit_send_many` | every copy of a fan-out: session records, outbox entries (in order), sent messages |
//! | `commit_deposits` | removes exactly the outbox entries named, stores exactly the sent messages given; an empty batch changes nothing |
//! | `pairing` | [`Store::set_pairing`] / [`Store::pairing`] round trip every field; a second offer replaces it; `None` drops it |
//! | `outbox` | oldest first; [`Store::remove_outbox`] removes one entry |
//! | `processed` | marks are set by [`Store::commit_receive`]; [`Store::processed_among`] agrees with [`Store::is_processed`]; [`Store::prune_processed`] drops those older than `before` only |
//! | `commit_receive` | every part of every commit of a batch is applied (a peer's access key included, its exclusion kept), later ones winning |
//! | `inbox` | in the order received; a duplicate envelope id adds nothing; [`Store::remove_inbox`] |
//! | `sent_messages` | first-stored order, [`Store::update_sent`] in place, [`Store::sent_message`], [`Store::pending_sent`], [`Store::last_pending_to`] |
//! | `prune_sent` | drops delivered and failed messages created before `before`, never pending ones |
//! | `routes` | [`Store::route_ratchet_keys`], [`Store::awaiting_ratchet_key`] and [`Store::sessions_with_identity`] agree with the records stored, after every kind of write |
//! | `u64_times` | times and counters use the whole `u64` range (a store keeping `i64`s must map them) |
//!
//! An error returned by the store (a [`StoreError::Backend`] for something
//! it does not support, say) fails the check that met it, naming the method
//! and the error. A store that panics is not caught: the panic names the
//! method, and the test harness the test.
//!
//! # Atomicity under injected failures: [`check_atomicity`]
//!
//! [`Store::commit_send`], [`Store::commit_receive`] and
//! [`Store::quarantine_session`] must apply all their changes or none:
//! that is what makes delivery exactly-once. Through the trait alone a
//! suite cannot make a write fail halfway, so [`check_atomicity`] takes an
//! injector from the implementor, `inject(store, Some(n))`: make the `n`-th
//! write from now on fail. It then fails each commit at every write in
//! turn and checks that each failure left everything as it was, and that
//! the commit that finally succeeds applied everything. The crate runs it
//! against the SQLite store with triggers that raise on the `n`-th row
//! written (`tests/store_conformance.rs`: a `commit_send` split into two
//! transactions fails it at the third write).
//!
//! ```
//! # use cubbyhole::storage::MemoryStore;
//! use cubbyhole::storage::conformance;
//! // A store that cannot fail passes an injector that does nothing.
//! cubbyhole::client::block_on(conformance::check_atomicity(&mut MemoryStore::new(), |_, _| {}))
//!     .unwrap();
//! ```
//!
//! # What is not checked: durability
//!
//! A write that returned `Ok` must survive a crash. That is the
//! implementor's to test (the process killed mid-commit, then the store
//! reopened and compared with the state before): the crate's
//! `tests/store_sqlite.rs` (`reopening_from_disk_keeps_everything`) and
//! `tests/kill.rs` do this for the SQLite store and may serve as examples.
//!
//! # Test data
//!
//! The keys are made with a small deterministic generator private to this
//! module, so that failures reproduce: it is not random and serves only to
//! build test data.

use std::fmt;
use std::string::String;
use std::vec::Vec;

use rand_core::{CryptoRng, RngCore};
use zeroize::Zeroizing;

use super::{
    AccessKeyRecord, AccountRecord, ContactRecord, DeliveryState, DepositDone, Failure,
    InboxMessage, LocalIdentity, MessageId, OutboxEntry, PairingRecord, PeerAccess, PeerRecord,
    PrekeyState, Quarantined, ReceiveCommit, SentMessage, SessionEntry, SessionRecord, Store,
    StoreError, Trust,
};
use crate::protocol::bundle::{FreshnessPolicy, VerifiedBundle};
use crate::protocol::devices::AccountId;
use crate::protocol::keys::IdentityKeyPair;
use crate::protocol::prekeys::PrekeyStore;
use crate::protocol::ratchet::SessionConfig;
use crate::protocol::session::Session;
use crate::protocol::wire::Incoming;
use crate::transport::{AccessKey, DeviceAddress, Envelope, EnvelopeId};

/// A broken promise: which check found it and what was wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The check's name (as in [`CHECKS`]).
    pub check: &'static str,
    /// What the store did wrong (or the error it returned).
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "store conformance: {}: {}", self.check, self.message)
    }
}

impl std::error::Error for Violation {}

/// One check of the suite (see [`CHECKS`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Check {
    /// Its name (the `check_*` function's, without the prefix).
    pub name: &'static str,
}

impl Check {
    /// Runs the check on a store, which must be empty (fresh).
    ///
    /// # Errors
    /// A [`Violation`] naming the check and what was wrong.
    pub async fn run<S: Store>(&self, store: &mut S) -> Result<(), Violation> {
        run_named(self.name, store).await
    }
}

/// Runs every check of [`CHECKS`], each on a fresh store from `make`, on
/// whatever executor awaits it (a browser's, for a store whose futures are
/// not `Send`); returns the violations found (every check runs, whatever
/// the others found).
///
/// # Errors
/// The violations, in the order of [`CHECKS`], if any check failed.
pub async fn try_run_async<S: Store>(mut make: impl FnMut() -> S) -> Result<(), Vec<Violation>> {
    let mut violations = Vec::new();
    for check in CHECKS {
        let mut store = make();
        if let Err(v) = check.run(&mut store).await {
            violations.push(v);
        }
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(violations)
    }
}

/// [`try_run_async`], driven to completion on this thread
/// ([`crate::client::block_on`]).
///
/// # Errors
/// The violations, in the order of [`CHECKS`], if any check failed.
pub fn try_run<S: Store>(make: impl FnMut() -> S) -> Result<(), Vec<Violation>> {
    crate::client::block_on(try_run_async(make))
}

/// Runs every check of [`CHECKS`], each on a fresh store from `make`.
///
/// # Panics
/// If any check fails, with a message naming each failed check and what
/// was wrong ("store conformance: commit_send: ...").
pub fn run<S: Store>(make: impl FnMut() -> S) {
    if let Err(violations) = try_run(make) {
        match violations.as_slice() {
            [one] => panic!("{one}"),
            all => {
                let lines: Vec<String> = all.iter().map(|v| format!("  {v}")).collect();
                panic!(
                    "store conformance: {} of {} checks failed:\n{}",
                    all.len(),
                    CHECKS.len(),
                    lines.join("\n")
                )
            }
        }
    }
}

macro_rules! checks {
    ($( $(#[$doc:meta])* $public:ident => $name:literal, $body:ident; )+) => {
        $(
            $(#[$doc])*
            ///
            /// The store must be empty (fresh).
            ///
            /// # Errors
            /// A [`Violation`] naming the check and what was wrong.
            pub async fn $public<S: Store>(store: &mut S) -> Result<(), Violation> {
                $body(store).await.map_err(|message| Violation { check: $name, message })
            }
        )+

        /// Every check, in the order [`run`] runs them.
        pub const CHECKS: &[Check] = &[$( Check { name: $name } ),+];

        async fn run_named<S: Store>(name: &str, store: &mut S) -> Result<(), Violation> {
            match name {
                $( $name => $public(store).await, )+
                _ => Err(Violation { check: "unknown", message: format!("no check named {name:?}") }),
            }
        }
    };
}

checks! {
    /// `empty`: a new store holds nothing (no identity, prekeys, sessions,
    /// quarantined records, peers, outbox entries, processed marks, sent or
    /// inbox messages), and removing, quarantining or pruning what is not
    /// there, or committing an empty batch, succeeds and changes nothing.
    check_empty => "empty", empty;
    /// `identity`: [`Store::identity`] returns what [`Store::set_identity`]
    /// stored (the key pair and the device number).
    check_identity => "identity", identity;
    /// `prekeys`: [`Store::prekeys`] returns what [`Store::set_prekeys`]
    /// stored, every field (the `accepted` list included); a second
    /// [`Store::set_prekeys`] replaces it.
    check_prekeys => "prekeys", prekeys;
    /// `sessions`: [`Store::session`] and [`Store::sessions`] return the
    /// records [`Store::set_session`] stored, each entry with its session
    /// state, id, generation, flags and times (and the same encoding,
    /// [`SessionRecord::to_bytes`]); [`Store::sessions`] lists each peer
    /// once, in any order; a second [`Store::set_session`] replaces the
    /// record; an unknown peer has none.
    check_sessions => "sessions", sessions;
    /// `remove_session`: [`Store::remove_session`] deletes one peer's
    /// record and no other; removing an absent record succeeds.
    check_remove_session => "remove_session", remove_session;
    /// `quarantine`: [`Store::quarantine_session`] moves the record: the
    /// peer has no session afterwards, and [`Store::quarantined`] lists it,
    /// oldest first, with the time, the reason and the stored bytes (not
    /// empty); quarantining a peer without a record does nothing; the peer
    /// can be given a new session.
    check_quarantine => "quarantine", quarantine;
    /// `peers`: [`Store::peer`] returns what [`Store::set_peer`] stored, a
    /// second [`Store::set_peer`] for the address replaces it,
    /// [`Store::peers`] lists each peer once and
    /// [`Store::peers_with_identity`] exactly those with the identity key
    /// (each in any order).
    check_peers => "peers", peers;
    /// `contacts`: [`Store::contact`] returns what [`Store::set_contact`]
    /// stored (name, devices, earlier keys, time), a second
    /// [`Store::set_contact`] of the name replaces it, [`Store::contacts`]
    /// lists each contact once, an unknown name has none, and a name of
    /// [`ContactRecord::MAX_NAME`] bytes (any bytes) is kept whole.
    check_contacts => "contacts", contacts;
    /// `access_keys`: [`Store::own_access_key`] returns what
    /// [`Store::set_own_access_key`] stored (epoch and key), a second one
    /// replaces it; [`Store::peer_access`] of an unknown peer is
    /// [`PeerAccess::default`], and returns the key of
    /// [`Store::set_peer_access_key`] and the flag of
    /// [`Store::set_peer_excluded`], each write keeping the other field and
    /// touching no other peer.
    check_access_keys => "access_keys", access_keys;
    /// `commit_send`: [`Store::commit_send`] stores the session record of
    /// the entry's recipient, appends the entry to the outbox and, if
    /// given, stores the sent message (a known id is updated in place); a
    /// send without a sent message stores none.
    check_commit_send => "commit_send", commit_send;
    /// `commit_send_many`: [`Store::commit_send_many`] stores every copy:
    /// each recipient's session record, each outbox entry (in the order
    /// given, after those already queued) and each sent message.
    check_commit_send_many => "commit_send_many", commit_send_many;
    /// `commit_deposits`: after a [`Store::commit_send_many`] of several
    /// copies, [`Store::commit_deposits`] removes exactly the outbox entries
    /// it names (the others stay, in their order; one no longer queued is
    /// no error) and stores exactly the sent messages it carries (in place,
    /// a later item of the batch winning; an item without one changes no
    /// message); an empty batch changes nothing.
    check_commit_deposits => "commit_deposits", commit_deposits;
    /// `accounts`: [`Store::own_account`] returns what
    /// [`Store::set_own_account`] stored (every field), a second one
    /// replaces it (even of another account); [`Store::account`] and
    /// [`Store::accounts`] return what [`Store::set_account`] stored, each
    /// account once, by account id, a second one replacing it; the own
    /// account is not a contact's and a contact's is not the own.
    check_accounts => "accounts", accounts;
    /// `pairing`: a new store has no pairing offer; [`Store::pairing`]
    /// returns what [`Store::set_pairing`] stored (code and both times), a
    /// second offer replaces it, and `set_pairing(None)` drops it (again:
    /// nothing to drop succeeds).
    check_pairing => "pairing", pairing;
    /// `outbox`: [`Store::outbox`] lists the committed entries, whole, oldest
    /// first (in commit order, whatever their ids); [`Store::remove_outbox`]
    /// removes one and keeps the others' order; removing an unknown id
    /// succeeds.
    check_outbox => "outbox", outbox;
    /// `processed`: [`Store::commit_receive`] marks each commit's envelope
    /// processed ([`Store::is_processed`]); [`Store::prune_processed`]
    /// forgets the marks older than `before` and keeps those at `before` or
    /// later.
    check_processed => "processed", processed;
    /// `commit_receive`: every part of every commit of a batch is applied:
    /// the session record, the prekeys, the peer record, the inbox message,
    /// the sent message, the peer's access key (its exclusion kept) and the
    /// processed mark; a later commit of the batch wins over an earlier one
    /// (same peer, sent message, prekeys, access key); an empty batch
    /// changes nothing.
    check_commit_receive => "commit_receive", commit_receive;
    /// `inbox`: [`Store::inbox`] lists the received messages, whole, in the
    /// order received (whatever their ids); a message whose envelope id is
    /// already in the inbox adds nothing (in the same batch or a later
    /// one: the first stays); [`Store::remove_inbox`] removes one and keeps
    /// the others' order.
    check_inbox => "inbox", inbox;
    /// `sent_messages`: [`Store::sent_messages`] lists the stored messages,
    /// whole, in the order first stored (whatever their ids), every
    /// delivery state kept; [`Store::update_sent`] of a known id replaces
    /// it in place; [`Store::sent_message`] finds each by id;
    /// [`Store::pending_sent`] lists exactly the pending ones, in the same
    /// order; [`Store::last_pending_to`] names the last pending one to each
    /// peer (none for a peer without one).
    check_sent_messages => "sent_messages", sent_messages;
    /// `prune_sent`: [`Store::prune_sent`] deletes the delivered and failed
    /// messages created before `before`, keeps those created at `before` or
    /// later, and never deletes a pending message, however old.
    check_prune_sent => "prune_sent", prune_sent;
    /// `u64_times`: times and counters round trip over their whole range
    /// (a store keeping SQL `INTEGER`s must map values from 2^63 on), and
    /// [`Store::prune_processed`] and [`Store::prune_sent`] compare times
    /// as `u64`s.
    check_u64_times => "u64_times", u64_times;
    /// `routes`: [`Store::route_ratchet_keys`] finds exactly the peers
    /// whose stored record can decrypt under one of the keys
    /// ([`SessionRecord::ratchet_keys`]), [`Store::awaiting_ratchet_key`]
    /// exactly those whose record awaits a new ratchet key
    /// ([`SessionRecord::awaits_ratchet_key`]) and
    /// [`Store::sessions_with_identity`] exactly the records of that
    /// identity key's devices, after every way a record is written or
    /// dropped: [`Store::set_session`], [`Store::commit_send`],
    /// [`Store::commit_receive`], [`Store::remove_session`],
    /// [`Store::quarantine_session`] (an index that is not kept up to date
    /// loses messages or routes them to a dropped record).
    check_routes => "routes", routes;
}

// ---------------------------------------------------------------------------
// Helpers.

/// The time the test data is made at (unix seconds, 2027).
const NOW: u64 = 1_800_000_000;

type Outcome = Result<(), String>;

/// Fails the check unless `cond`, with a formatted message.
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

/// Turns a store error into the check's failure, naming the method.
trait OrFail<T> {
    fn or_fail(self, method: &str) -> Result<T, String>;
}

impl<T> OrFail<T> for Result<T, StoreError> {
    fn or_fail(self, method: &str) -> Result<T, String> {
        self.map_err(|e| format!("Store::{method} returned an error: {e} ({e:?})"))
    }
}

/// `got == want`, or a failure describing both.
fn same<T: PartialEq + fmt::Debug + ?Sized>(what: &str, got: &T, want: &T) -> Outcome {
    if got == want {
        return Ok(());
    }
    let (g, w) = (compact(&format!("{got:?}")), compact(&format!("{want:?}")));
    if g == w {
        Err(format!(
            "{what}: differs from what was stored in a field not shown (a body?): {g}"
        ))
    } else {
        Err(format!("{what}: got {g}, expected {w}"))
    }
}

/// `Debug` output with its byte arrays (keys, ids, payloads: lists of
/// eight numbers or more) shortened to hex.
fn compact(debug: &str) -> String {
    let mut out = String::with_capacity(debug.len());
    let mut rest = debug;
    while let Some(open) = rest.find('[') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let bytes = after.find(']').and_then(|close| {
            let list: Option<Vec<u8>> =
                after[..close].split(", ").map(|n| n.parse().ok()).collect();
            list.filter(|b| b.len() >= 8).map(|b| (b, close))
        });
        match bytes {
            Some((bytes, close)) => {
                if bytes.len() <= 16 {
                    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                    out.push_str(&format!("<{hex}>"));
                } else {
                    out.push_str(&format!("<{} bytes {}>", bytes.len(), short(&bytes)));
                }
                rest = &after[close + 1..];
            }
            None => {
                out.push('[');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

fn present<T>(value: Option<T>, what: &str) -> Result<T, String> {
    value.ok_or_else(|| format!("{what} returned None"))
}

fn short(bytes: &[u8]) -> String {
    let mut s: String = bytes.iter().take(4).map(|b| format!("{b:02x}")).collect();
    s.push_str("..");
    s
}

fn name(a: &DeviceAddress) -> String {
    format!("{}/{}", short(&a.identity), a.device_id)
}

/// Compares two session records entry by entry (found by id), then their
/// encodings.
fn same_record(what: &str, got: &SessionRecord, want: &SessionRecord) -> Outcome {
    ensure!(
        got.entries().len() == want.entries().len(),
        "{what}: {} sessions in the record, expected {}",
        got.entries().len(),
        want.entries().len()
    );
    for w in want.entries() {
        let id = short(&w.id);
        let g = got
            .find(&w.id)
            .ok_or_else(|| format!("{what}: the session {id} is missing from the record"))?;
        same(
            &format!("{what}: session {id}: generation"),
            &g.generation,
            &w.generation,
        )?;
        same(
            &format!("{what}: session {id}: superseded"),
            &g.superseded,
            &w.superseded,
        )?;
        same(&format!("{what}: session {id}: reset"), &g.reset, &w.reset)?;
        same(
            &format!("{what}: session {id}: created"),
            &g.created,
            &w.created,
        )?;
        same(
            &format!("{what}: session {id}: last_received"),
            &g.last_received,
            &w.last_received,
        )?;
        ensure!(
            g.session.to_bytes() == w.session.to_bytes(),
            "{what}: session {id}: the session state differs from the one stored"
        );
    }
    ensure!(
        got.to_bytes() == want.to_bytes(),
        "{what}: the same sessions but a different encoding (entries reordered?)"
    );
    Ok(())
}

fn same_prekeys(what: &str, got: &PrekeyState, want: &PrekeyState) -> Outcome {
    same(
        &format!("{what}: upload_counter"),
        &got.upload_counter,
        &want.upload_counter,
    )?;
    same(
        &format!("{what}: last_rotation"),
        &got.last_rotation,
        &want.last_rotation,
    )?;
    same(
        &format!("{what}: retired_at"),
        &got.retired_at,
        &want.retired_at,
    )?;
    same(
        &format!("{what}: one_time_retired"),
        &got.one_time_retired,
        &want.one_time_retired,
    )?;
    same(
        &format!("{what}: upload_pending"),
        &got.upload_pending,
        &want.upload_pending,
    )?;
    same(&format!("{what}: accepted"), &got.accepted, &want.accepted)?;
    ensure!(
        got.prekeys.to_bytes() == want.prekeys.to_bytes(),
        "{what}: the prekeys (signed and one-time) differ from those stored"
    );
    ensure!(
        got.to_bytes() == want.to_bytes(),
        "{what}: the encoding differs from the state stored"
    );
    Ok(())
}

/// Peer records sorted by address (for order-free comparison).
fn sorted(mut peers: Vec<PeerRecord>) -> Vec<PeerRecord> {
    peers.sort_by_key(|p| p.address);
    peers
}

/// A distinct envelope id for each `k`, descending as `k` grows (so that
/// a store ordering by id instead of by insertion is caught).
fn eid(k: u8) -> EnvelopeId {
    let mut id = [0xffu8 - k; 16];
    id[15] = 0x5a;
    EnvelopeId(id)
}

/// A distinct message id for each `k`, descending as `k` grows.
fn mid(k: u8) -> MessageId {
    let mut id = [0xffu8 - k; 16];
    id[15] = 0xa5;
    MessageId(id)
}

fn sent(k: u8, to: DeviceAddress, state: DeliveryState, created: u64) -> SentMessage {
    SentMessage {
        id: mid(k),
        to,
        body: if state.is_pending() {
            format!("message {k}").into_bytes()
        } else {
            Vec::new()
        },
        state,
        created,
        last_sent: created,
        sends: 1,
    }
}

fn message(id: EnvelopeId, from: DeviceAddress, body: &[u8], at: u64) -> InboxMessage {
    InboxMessage {
        envelope_id: id,
        from,
        body: body.to_vec(),
        received_at: at,
    }
}

/// A receive commit that adds a message (and marks its envelope).
fn commit(m: &InboxMessage) -> ReceiveCommit<'_> {
    ReceiveCommit {
        message: Some(m),
        ..mark(m.envelope_id, m.received_at)
    }
}

/// A receive commit that changes nothing but the processed mark.
fn mark(envelope_id: EnvelopeId, processed_at: u64) -> ReceiveCommit<'static> {
    ReceiveCommit {
        envelope_id,
        processed_at,
        session: None,
        prekeys: None,
        peer: None,
        message: None,
        sent: None,
        access: None,
    }
}

/// An access key record made of one repeated byte.
fn access(epoch: u32, k: u8) -> AccessKeyRecord {
    AccessKeyRecord {
        epoch,
        key: AccessKey::from_bytes([k; 16]),
        // Every other record names a peer's private inbox (kept, compared).
        inbox: (k % 2 == 0).then(|| ([k; 32], AccessKey::from_bytes([k ^ 0xff; 16]))),
    }
}

fn entry(to: DeviceAddress, id: EnvelopeId, payload: Vec<u8>, created: u64) -> OutboxEntry {
    // Every other entry carries a message id (kept, compared).
    let message = (id.0[15] % 2 == 0).then_some(MessageId([id.0[15]; 16]));
    OutboxEntry {
        to,
        envelope: Envelope { id, payload },
        created,
        message,
    }
}

/// The deterministic generator of the test data (SplitMix64). It is not
/// random: it implements [`CryptoRng`] only so that the protocol's key
/// generation accepts it for building test data.
struct TestDataRng(u64);

impl RngCore for TestDataRng {
    fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        rand_core::impls::fill_bytes_via_next(self, dest);
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl CryptoRng for TestDataRng {}

/// Real protocol objects: our identity and prekeys, and three peer devices
/// (each with its own identity key) with a session with each.
struct Fixture {
    rng: TestDataRng,
    me: LocalIdentity,
    prekeys: PrekeyState,
    /// The peer devices, their bundles and our current session with each.
    peers: Vec<(DeviceAddress, VerifiedBundle, Session)>,
}

fn protocol<T>(r: crate::Result<T>, what: &str) -> Result<T, String> {
    r.map_err(|e| format!("building the test data ({what}) failed: {e:?}"))
}

impl Fixture {
    fn new() -> Result<Self, String> {
        let mut rng = TestDataRng(0x0063_7562_6279_686f);
        let keys = IdentityKeyPair::generate(&mut rng);
        let mut store = protocol(PrekeyStore::new(&mut rng, &keys, NOW - 3600), "prekeys")?;
        store.generate_one_time_prekeys(&mut rng, 3);
        let prekeys = PrekeyState {
            prekeys: store,
            upload_counter: 3,
            last_rotation: NOW - 3600,
            retired_at: vec![(7, NOW - 50)],
            one_time_retired: vec![(3, NOW - 40)],
            upload_pending: true,
            accepted: vec![(1, [0xac; 16]), (1, [0xad; 16])],
        };
        let mut peers = Vec::new();
        for device_id in 1..=3 {
            let them = IdentityKeyPair::generate(&mut rng);
            let mut theirs = protocol(PrekeyStore::new(&mut rng, &them, NOW), "prekeys")?;
            theirs.generate_one_time_prekeys(&mut rng, 1);
            let bundle = protocol(
                theirs.bundle(&them).verify(NOW, FreshnessPolicy::default()),
                "bundle",
            )?;
            let mut session = protocol(
                Session::initiate(&mut rng, &keys, &bundle, SessionConfig::default()),
                "session",
            )?;
            protocol(session.encrypt(&mut rng, b"hello"), "encrypt")?;
            peers.push((
                DeviceAddress::new(them.public(), device_id),
                bundle,
                session,
            ));
        }
        Ok(Fixture {
            rng,
            me: LocalIdentity { keys, device_id: 9 },
            prekeys,
            peers,
        })
    }

    fn local(&self) -> DeviceAddress {
        DeviceAddress::new(self.me.keys.public(), self.me.device_id)
    }

    fn address(&self, i: usize) -> DeviceAddress {
        self.peers[i].0
    }

    /// A record of the session with peer `i`, advanced by one message (so
    /// each call gives a different record).
    fn record(&mut self, i: usize) -> Result<SessionRecord, String> {
        let session = &mut self.peers[i].2;
        protocol(session.encrypt(&mut self.rng, b"more"), "encrypt")?;
        Ok(SessionRecord::single(SessionEntry::new(
            session.clone(),
            1,
            NOW,
        )))
    }

    /// A record of a session we accepted from a new peer (device 4 of a
    /// new identity key), which has not sent yet: it does not await a new
    /// ratchet key.
    fn responder(&mut self) -> Result<(DeviceAddress, SessionRecord), String> {
        let them = IdentityKeyPair::generate(&mut self.rng);
        let bundle = protocol(
            self.prekeys
                .prekeys
                .bundle(&self.me.keys)
                .verify(NOW, FreshnessPolicy::default()),
            "bundle",
        )?;
        let mut theirs = protocol(
            Session::initiate(&mut self.rng, &them, &bundle, SessionConfig::default()),
            "session",
        )?;
        let first = protocol(theirs.encrypt(&mut self.rng, b"hi"), "encrypt")?;
        let incoming = protocol(Incoming::decode(&first), "decode")?;
        let accepted = protocol(
            Session::accept(
                &self.me.keys,
                &self.prekeys.prekeys,
                &incoming,
                SessionConfig::default(),
            ),
            "accept",
        )?;
        Ok((
            DeviceAddress::new(them.public(), 4),
            SessionRecord::single(SessionEntry::new(accepted.session, 1, NOW)),
        ))
    }

    /// A record of two sessions with peer `i`: an older one, superseded,
    /// that received at `NOW - 1`, and the current one, of a later
    /// generation, with the reset flag.
    fn two_sessions(&mut self, i: usize) -> Result<SessionRecord, String> {
        let (address, bundle, _) = &self.peers[i];
        let (address, bundle) = (*address, bundle.clone());
        let old = protocol(
            Session::initiate(
                &mut self.rng,
                &self.me.keys,
                &bundle,
                SessionConfig::default(),
            ),
            "session",
        )?;
        let mut old = SessionEntry::new(old, 4, NOW - 9);
        old.superseded = true;
        old.last_received = NOW - 1;
        let mut record = SessionRecord::single(old);
        let current = self.record(i)?.entries()[0].session.clone();
        let mut current = SessionEntry::new(current, 5, NOW);
        current.reset = true;
        record.insert(current, 40, &self.local(), &address);
        ensure!(
            record.entries().len() == 2,
            "building the test data: a record of two sessions holds {}",
            record.entries().len()
        );
        Ok(record)
    }
}

// ---------------------------------------------------------------------------
// The checks.

/// Everything a fresh store must show empty, for the peers of `fx`.
async fn is_empty<S: Store>(store: &S, fx: &Fixture, when: &str) -> Outcome {
    let a = fx.address(0);
    ensure!(
        store.identity().await.or_fail("identity")?.is_none(),
        "{when}: identity() is Some"
    );
    ensure!(
        store.prekeys().await.or_fail("prekeys")?.is_none(),
        "{when}: prekeys() is Some"
    );
    ensure!(
        store
            .own_access_key()
            .await
            .or_fail("own_access_key")?
            .is_none(),
        "{when}: own_access_key() is Some"
    );
    same(
        &format!("{when}: peer_access()"),
        &store.peer_access(&a).await.or_fail("peer_access")?,
        &PeerAccess::default(),
    )?;
    ensure!(
        store.session(&a).await.or_fail("session")?.is_none(),
        "{when}: session() is Some"
    );
    same(
        &format!("{when}: sessions().len()"),
        &store.sessions().await.or_fail("sessions")?.len(),
        &0,
    )?;
    same(
        &format!("{when}: quarantined()"),
        &store.quarantined().await.or_fail("quarantined")?,
        &Vec::new(),
    )?;
    same(
        &format!("{when}: peer()"),
        &store.peer(&a).await.or_fail("peer")?,
        &None,
    )?;
    same(
        &format!("{when}: peers()"),
        &store.peers().await.or_fail("peers")?,
        &Vec::new(),
    )?;
    same(
        &format!("{when}: peers_with_identity()"),
        &store
            .peers_with_identity(&a.identity)
            .await
            .or_fail("peers_with_identity")?,
        &Vec::new(),
    )?;
    same(
        &format!("{when}: outbox()"),
        &store.outbox().await.or_fail("outbox")?,
        &Vec::new(),
    )?;
    ensure!(
        !store.is_processed(&eid(0)).await.or_fail("is_processed")?,
        "{when}: is_processed() is true"
    );
    same(
        &format!("{when}: sent_messages()"),
        &store.sent_messages().await.or_fail("sent_messages")?,
        &Vec::new(),
    )?;
    same(
        &format!("{when}: pending_sent()"),
        &store.pending_sent().await.or_fail("pending_sent")?,
        &Vec::new(),
    )?;
    same(
        &format!("{when}: sent_message()"),
        &store.sent_message(&mid(0)).await.or_fail("sent_message")?,
        &None,
    )?;
    same(
        &format!("{when}: inbox()"),
        &store.inbox().await.or_fail("inbox")?,
        &Vec::new(),
    )?;
    Ok(())
}

async fn empty<S: Store>(store: &mut S) -> Outcome {
    let fx = Fixture::new()?;
    is_empty(store, &fx, "a new store").await?;
    let a = fx.address(0);
    store.remove_session(&a).await.or_fail("remove_session")?;
    store
        .quarantine_session(&a, NOW, "no record")
        .await
        .or_fail("quarantine_session")?;
    store
        .remove_outbox(&eid(0))
        .await
        .or_fail("remove_outbox")?;
    store.remove_inbox(&eid(0)).await.or_fail("remove_inbox")?;
    store
        .prune_processed(u64::MAX)
        .await
        .or_fail("prune_processed")?;
    store.prune_sent(u64::MAX).await.or_fail("prune_sent")?;
    store.commit_receive(&[]).await.or_fail("commit_receive")?;
    is_empty(
        store,
        &fx,
        "after removing, quarantining and pruning nothing in a new store",
    )
    .await
}

async fn identity<S: Store>(store: &mut S) -> Outcome {
    let fx = Fixture::new()?;
    store.set_identity(&fx.me).await.or_fail("set_identity")?;
    let got = present(
        store.identity().await.or_fail("identity")?,
        "identity() after set_identity",
    )?;
    ensure!(
        *got.keys.seed() == *fx.me.keys.seed(),
        "identity(): the key pair differs from the one stored"
    );
    ensure!(
        got.keys.public().as_bytes() == fx.me.keys.public().as_bytes(),
        "identity(): the public key differs from the one stored"
    );
    same("identity(): device_id", &got.device_id, &fx.me.device_id)
}

async fn prekeys<S: Store>(store: &mut S) -> Outcome {
    let fx = Fixture::new()?;
    store
        .set_prekeys(&fx.prekeys)
        .await
        .or_fail("set_prekeys")?;
    let got = present(
        store.prekeys().await.or_fail("prekeys")?,
        "prekeys() after set_prekeys",
    )?;
    same_prekeys("prekeys()", &got, &fx.prekeys)?;

    // The state as a receive and a maintenance leave it: a one-time
    // prekey consumed, a message accepted, the upload confirmed.
    let mut next = fx.prekeys.clone();
    let used = next.prekeys.one_time_prekeys().next().map(|k| k.id());
    if let Some(id) = used {
        next.prekeys.remove_one_time_prekey(id);
    }
    next.upload_counter += 1;
    next.last_rotation = NOW;
    next.retired_at.push((8, NOW));
    next.one_time_retired.clear();
    next.upload_pending = false;
    next.accepted.push((2, [0xae; 16]));
    store.set_prekeys(&next).await.or_fail("set_prekeys")?;
    let got = present(
        store.prekeys().await.or_fail("prekeys")?,
        "prekeys() after a second set_prekeys",
    )?;
    same_prekeys("prekeys() after a second set_prekeys", &got, &next)
}

/// Checks `sessions()` lists exactly `want` (in any order), each record
/// loading.
async fn sessions_are<S: Store>(
    store: &S,
    want: &[(DeviceAddress, &SessionRecord)],
    when: &str,
) -> Outcome {
    let got = store.sessions().await.or_fail("sessions")?;
    let mut addresses: Vec<DeviceAddress> = got.iter().map(|(a, _)| *a).collect();
    addresses.sort();
    let mut expected: Vec<DeviceAddress> = want.iter().map(|(a, _)| *a).collect();
    expected.sort();
    ensure!(
        addresses == expected,
        "{when}: sessions() lists {} (sorted), expected {}",
        addresses.iter().map(name).collect::<Vec<_>>().join(", "),
        expected.iter().map(name).collect::<Vec<_>>().join(", ")
    );
    for (address, record) in got {
        let record = record.map_err(|e| {
            format!(
                "{when}: sessions() returned an error for {}: {e}",
                name(&address)
            )
        })?;
        let (_, expected) = want
            .iter()
            .find(|(a, _)| *a == address)
            .ok_or_else(|| format!("{when}: sessions() lists {}", name(&address)))?;
        same_record(
            &format!("{when}: sessions(), {}", name(&address)),
            &record,
            expected,
        )?;
    }
    Ok(())
}

async fn session_is<S: Store>(
    store: &S,
    peer: &DeviceAddress,
    want: &SessionRecord,
    when: &str,
) -> Outcome {
    let what = format!("{when}: session({})", name(peer));
    let got = present(store.session(peer).await.or_fail("session")?, &what)?;
    same_record(&what, &got, want)
}

async fn sessions<S: Store>(store: &mut S) -> Outcome {
    let mut fx = Fixture::new()?;
    store.set_identity(&fx.me).await.or_fail("set_identity")?;
    let a: Vec<DeviceAddress> = (0..3).map(|i| fx.address(i)).collect();
    let r0 = fx.two_sessions(0)?;
    let r1 = fx.record(1)?;
    let r2 = fx.record(2)?;
    for (peer, record) in [(&a[0], &r0), (&a[1], &r1), (&a[2], &r2)] {
        store
            .set_session(peer, record)
            .await
            .or_fail("set_session")?;
    }
    session_is(store, &a[0], &r0, "after set_session").await?;
    session_is(store, &a[1], &r1, "after set_session").await?;
    session_is(store, &a[2], &r2, "after set_session").await?;
    sessions_are(
        store,
        &[(a[0], &r0), (a[1], &r1), (a[2], &r2)],
        "after set_session",
    )
    .await?;
    // Another device of peer 0's identity has no session.
    let other = DeviceAddress {
        identity: a[0].identity,
        device_id: a[0].device_id + 100,
    };
    same(
        "session() of a peer never stored: is_some",
        &store.session(&other).await.or_fail("session")?.is_some(),
        &false,
    )?;

    // Replaced, not added.
    let r1b = fx.record(1)?;
    store
        .set_session(&a[1], &r1b)
        .await
        .or_fail("set_session")?;
    session_is(store, &a[1], &r1b, "after a second set_session").await?;
    sessions_are(
        store,
        &[(a[0], &r0), (a[1], &r1b), (a[2], &r2)],
        "after a second set_session",
    )
    .await
}

async fn remove_session<S: Store>(store: &mut S) -> Outcome {
    let mut fx = Fixture::new()?;
    store.set_identity(&fx.me).await.or_fail("set_identity")?;
    let (a0, a1) = (fx.address(0), fx.address(1));
    let r0 = fx.record(0)?;
    let r1 = fx.record(1)?;
    store.set_session(&a0, &r0).await.or_fail("set_session")?;
    store.set_session(&a1, &r1).await.or_fail("set_session")?;
    store.remove_session(&a0).await.or_fail("remove_session")?;
    ensure!(
        store.session(&a0).await.or_fail("session")?.is_none(),
        "session() still returns the removed record"
    );
    session_is(store, &a1, &r1, "after removing another peer's record").await?;
    sessions_are(store, &[(a1, &r1)], "after remove_session").await?;
    same(
        "quarantined() after remove_session",
        &store.quarantined().await.or_fail("quarantined")?,
        &Vec::new(),
    )?;
    // Absent records: nothing happens.
    store.remove_session(&a0).await.or_fail("remove_session")?;
    store
        .remove_session(&fx.address(2))
        .await
        .or_fail("remove_session")?;
    sessions_are(store, &[(a1, &r1)], "after removing absent records").await?;
    // The peer can have a record again.
    store.set_session(&a0, &r0).await.or_fail("set_session")?;
    session_is(store, &a0, &r0, "after set_session of a removed peer").await
}

async fn quarantine<S: Store>(store: &mut S) -> Outcome {
    let mut fx = Fixture::new()?;
    store.set_identity(&fx.me).await.or_fail("set_identity")?;
    let a: Vec<DeviceAddress> = (0..3).map(|i| fx.address(i)).collect();
    let r0 = fx.two_sessions(0)?;
    let r1 = fx.record(1)?;
    let r2 = fx.record(2)?;
    for (peer, record) in [(&a[0], &r0), (&a[1], &r1), (&a[2], &r2)] {
        store
            .set_session(peer, record)
            .await
            .or_fail("set_session")?;
    }
    let quarantined = async |store: &S| -> Result<Vec<(DeviceAddress, u64, String)>, String> {
        let q: Vec<Quarantined> = store.quarantined().await.or_fail("quarantined")?;
        if let Some(empty) = q.iter().find(|q| q.bytes.is_empty()) {
            return Err(format!(
                "quarantined(): the record of {} has no bytes (the stored record must be kept)",
                name(&empty.peer)
            ));
        }
        Ok(q.into_iter().map(|q| (q.peer, q.at, q.reason)).collect())
    };

    store
        .quarantine_session(&a[0], NOW + 1, "did not decrypt")
        .await
        .or_fail("quarantine_session")?;
    ensure!(
        store.session(&a[0]).await.or_fail("session")?.is_none(),
        "session() still returns the quarantined record (quarantine moves it)"
    );
    sessions_are(
        store,
        &[(a[1], &r1), (a[2], &r2)],
        "after quarantine_session",
    )
    .await?;
    same(
        "quarantined() after quarantine_session",
        &quarantined(store).await?,
        &vec![(a[0], NOW + 1, "did not decrypt".into())],
    )?;

    // No record (quarantined already, or never stored): nothing happens.
    store
        .quarantine_session(&a[0], NOW + 2, "again")
        .await
        .or_fail("quarantine_session")?;
    let never = DeviceAddress {
        identity: a[1].identity,
        device_id: a[1].device_id + 100,
    };
    store
        .quarantine_session(&never, NOW + 2, "never stored")
        .await
        .or_fail("quarantine_session")?;
    same(
        "quarantined() after quarantining peers without a record",
        &quarantined(store).await?,
        &vec![(a[0], NOW + 1, "did not decrypt".into())],
    )?;

    // A second one comes after the first (oldest first), an empty reason
    // kept as it is.
    store
        .quarantine_session(&a[2], NOW + 3, "")
        .await
        .or_fail("quarantine_session")?;
    same(
        "quarantined() after a second quarantine_session",
        &quarantined(store).await?,
        &vec![
            (a[0], NOW + 1, "did not decrypt".into()),
            (a[2], NOW + 3, String::new()),
        ],
    )?;
    sessions_are(store, &[(a[1], &r1)], "after a second quarantine_session").await?;

    // The peer starts afresh.
    let fresh = fx.record(0)?;
    store
        .set_session(&a[0], &fresh)
        .await
        .or_fail("set_session")?;
    session_is(
        store,
        &a[0],
        &fresh,
        "after set_session of a quarantined peer",
    )
    .await?;
    same(
        "quarantined().len() after set_session of a quarantined peer",
        &quarantined(store).await?.len(),
        &2,
    )
}

async fn contacts<S: Store>(store: &mut S) -> Outcome {
    let fx = Fixture::new()?;
    let (a0, a1) = (fx.address(0), fx.address(1));
    let alice = ContactRecord {
        name: b"alice".to_vec(),
        devices: vec![a0, a1],
        previous: vec![[7; 32], a1.identity],
        changed_at: u64::MAX,
    };
    let long = ContactRecord {
        name: (0..ContactRecord::MAX_NAME).map(|i| i as u8).collect(),
        devices: Vec::new(),
        previous: Vec::new(),
        changed_at: 0,
    };
    same(
        "contact() of an unknown name",
        &store.contact(b"alice").await.or_fail("contact")?,
        &None,
    )?;
    for c in [&alice, &long] {
        store.set_contact(c).await.or_fail("set_contact")?;
    }
    same(
        "contact(alice)",
        &store.contact(b"alice").await.or_fail("contact")?,
        &Some(alice.clone()),
    )?;
    same(
        "contact(a 255-byte name)",
        &store.contact(&long.name).await.or_fail("contact")?,
        &Some(long.clone()),
    )?;
    // Replaced, not added.
    let alice2 = ContactRecord {
        devices: vec![a1],
        previous: Vec::new(),
        changed_at: NOW,
        ..alice.clone()
    };
    store.set_contact(&alice2).await.or_fail("set_contact")?;
    same(
        "contact(alice) after a second set_contact",
        &store.contact(b"alice").await.or_fail("contact")?,
        &Some(alice2.clone()),
    )?;
    let mut all = store.contacts().await.or_fail("contacts")?;
    all.sort_by(|x, y| x.name.cmp(&y.name));
    let mut want = vec![alice2, long];
    want.sort_by(|x, y| x.name.cmp(&y.name));
    same("contacts()", &all, &want)?;
    same(
        "contact() of a name that is a prefix of another",
        &store.contact(b"ali").await.or_fail("contact")?,
        &None,
    )
}

async fn access_keys<S: Store>(store: &mut S) -> Outcome {
    let fx = Fixture::new()?;
    let (a0, a1, a2) = (fx.address(0), fx.address(1), fx.address(2));
    let own = async |s: &S| s.own_access_key().await;
    same(
        "own_access_key() of a new store",
        &own(store).await.or_fail("own_access_key")?,
        &None,
    )?;
    store
        .set_own_access_key(&access(1, 0x11))
        .await
        .or_fail("set_own_access_key")?;
    same(
        "own_access_key() after set_own_access_key",
        &own(store).await.or_fail("own_access_key")?,
        &Some(access(1, 0x11)),
    )?;
    store
        .set_own_access_key(&access(u32::MAX, 0x12))
        .await
        .or_fail("set_own_access_key")?;
    same(
        "own_access_key() after a second set_own_access_key (replaced)",
        &own(store).await.or_fail("own_access_key")?,
        &Some(access(u32::MAX, 0x12)),
    )?;

    let peer = async |s: &S, a: &DeviceAddress| s.peer_access(a).await.or_fail("peer_access");
    same(
        "peer_access() of an unknown peer",
        &peer(store, &a0).await?,
        &PeerAccess::default(),
    )?;
    store
        .set_peer_access_key(&a0, &access(3, 0x30))
        .await
        .or_fail("set_peer_access_key")?;
    store
        .set_peer_excluded(&a1, true)
        .await
        .or_fail("set_peer_excluded")?;
    same(
        "peer_access() after set_peer_access_key",
        &peer(store, &a0).await?,
        &PeerAccess {
            key: Some(access(3, 0x30)),
            excluded: false,
        },
    )?;
    same(
        "peer_access() after set_peer_excluded",
        &peer(store, &a1).await?,
        &PeerAccess {
            key: None,
            excluded: true,
        },
    )?;
    // Each write keeps the other field.
    store
        .set_peer_excluded(&a0, true)
        .await
        .or_fail("set_peer_excluded")?;
    store
        .set_peer_access_key(&a1, &access(7, 0x70))
        .await
        .or_fail("set_peer_access_key")?;
    same(
        "peer_access() after set_peer_excluded of a peer with a key (the key stays)",
        &peer(store, &a0).await?,
        &PeerAccess {
            key: Some(access(3, 0x30)),
            excluded: true,
        },
    )?;
    same(
        "peer_access() after set_peer_access_key of an excluded peer (still excluded)",
        &peer(store, &a1).await?,
        &PeerAccess {
            key: Some(access(7, 0x70)),
            excluded: true,
        },
    )?;
    store
        .set_peer_access_key(&a0, &access(4, 0x40))
        .await
        .or_fail("set_peer_access_key")?;
    store
        .set_peer_excluded(&a1, false)
        .await
        .or_fail("set_peer_excluded")?;
    same(
        "peer_access() after a second set_peer_access_key (replaced, still excluded)",
        &peer(store, &a0).await?,
        &PeerAccess {
            key: Some(access(4, 0x40)),
            excluded: true,
        },
    )?;
    same(
        "peer_access() after set_peer_excluded(false)",
        &peer(store, &a1).await?,
        &PeerAccess {
            key: Some(access(7, 0x70)),
            excluded: false,
        },
    )?;
    same(
        "peer_access() of a peer never written",
        &peer(store, &a2).await?,
        &PeerAccess::default(),
    )?;
    same(
        "own_access_key() after the peers' writes",
        &own(store).await.or_fail("own_access_key")?,
        &Some(access(u32::MAX, 0x12)),
    )
}

async fn peers<S: Store>(store: &mut S) -> Outcome {
    let fx = Fixture::new()?;
    let a0 = fx.address(0);
    // A second device with peer 0's identity key.
    let a0b = DeviceAddress {
        identity: a0.identity,
        device_id: a0.device_id + 6,
    };
    let (a1, a2) = (fx.address(1), fx.address(2));
    let record = |address, trust, first_seen| PeerRecord {
        address,
        trust,
        first_seen,
    };
    let p0 = record(a0, Trust::Unvalidated, NOW);
    let p0b = record(a0b, Trust::Validated, NOW + 1);
    let p1 = record(a1, Trust::Compromised, NOW + 2);
    let p2 = record(a2, Trust::Unvalidated, 0);
    for p in [&p0, &p0b, &p1, &p2] {
        store.set_peer(p).await.or_fail("set_peer")?;
    }
    for p in [&p0, &p0b, &p1, &p2] {
        same(
            &format!("peer({})", name(&p.address)),
            &store.peer(&p.address).await.or_fail("peer")?,
            &Some(p.clone()),
        )?;
    }
    // Replaced, not added.
    let p0v = record(a0, Trust::Validated, NOW);
    store.set_peer(&p0v).await.or_fail("set_peer")?;
    same(
        "peer() after a second set_peer",
        &store.peer(&a0).await.or_fail("peer")?,
        &Some(p0v.clone()),
    )?;
    same(
        "peers() (sorted by address)",
        &sorted(store.peers().await.or_fail("peers")?),
        &sorted(vec![p0v.clone(), p0b.clone(), p1.clone(), p2.clone()]),
    )?;
    same(
        "peers_with_identity() of a key with two devices (sorted by address)",
        &sorted(
            store
                .peers_with_identity(&a0.identity)
                .await
                .or_fail("peers_with_identity")?,
        ),
        &sorted(vec![p0v, p0b]),
    )?;
    same(
        "peers_with_identity() of a key with one device",
        &store
            .peers_with_identity(&a1.identity)
            .await
            .or_fail("peers_with_identity")?,
        &vec![p1],
    )?;
    same(
        "peers_with_identity() of an unknown key",
        &store
            .peers_with_identity(fx.me.keys.public().as_bytes())
            .await
            .or_fail("peers_with_identity")?,
        &Vec::new(),
    )?;
    let unknown = DeviceAddress {
        identity: a1.identity,
        device_id: a1.device_id + 6,
    };
    same(
        "peer() of an unknown device",
        &store.peer(&unknown).await.or_fail("peer")?,
        &None,
    )
}

async fn commit_send<S: Store>(store: &mut S) -> Outcome {
    let mut fx = Fixture::new()?;
    store.set_identity(&fx.me).await.or_fail("set_identity")?;
    let (a0, a1) = (fx.address(0), fx.address(1));

    // A first message to peer 0.
    let r0 = fx.record(0)?;
    let e0 = entry(a0, eid(0), vec![1; 40], NOW);
    let s0 = sent(0, a0, DeliveryState::Stored, NOW);
    store
        .commit_send(&r0, &e0, Some(&s0))
        .await
        .or_fail("commit_send")?;
    let what = "after commit_send";
    let got = store.session(&a0).await.or_fail("session")?;
    let got = got.ok_or_else(|| format!("{what}: the session record is missing"))?;
    same_record(&format!("{what}: session()"), &got, &r0)?;
    let outbox = store.outbox().await.or_fail("outbox")?;
    ensure!(!outbox.is_empty(), "{what}: the outbox entry is missing");
    same(&format!("{what}: outbox()"), &outbox, &vec![e0.clone()])?;
    let sent_messages = store.sent_messages().await.or_fail("sent_messages")?;
    ensure!(
        !sent_messages.is_empty(),
        "{what}: the sent message is missing"
    );
    same(
        &format!("{what}: sent_messages()"),
        &sent_messages,
        &vec![s0.clone()],
    )?;
    same(
        &format!("{what}: sent_message()"),
        &store.sent_message(&s0.id).await.or_fail("sent_message")?,
        &Some(s0.clone()),
    )?;

    // A second message, stored on its own.
    let s1 = sent(1, a1, DeliveryState::Deposited, NOW + 1);
    store.update_sent(&s1).await.or_fail("update_sent")?;

    // Without a sent message (a receipt, say): the record is replaced.
    let r0b = fx.record(0)?;
    let e1 = entry(a0, eid(1), vec![2; 30], NOW + 2);
    store
        .commit_send(&r0b, &e1, None)
        .await
        .or_fail("commit_send")?;
    let what = "after a commit_send without a sent message";
    session_is(store, &a0, &r0b, what).await?;
    same(
        &format!("{what}: outbox()"),
        &store.outbox().await.or_fail("outbox")?,
        &vec![e0.clone(), e1.clone()],
    )?;
    same(
        &format!("{what}: sent_messages()"),
        &store.sent_messages().await.or_fail("sent_messages")?,
        &vec![s0.clone(), s1.clone()],
    )?;

    // A re-send of the first message, to another peer's session record:
    // the sent message is updated in place.
    let r1 = fx.record(1)?;
    let e2 = entry(a1, eid(2), vec![3; 50], NOW + 3);
    let s0_resent = SentMessage {
        state: DeliveryState::Resent,
        last_sent: NOW + 3,
        sends: 2,
        ..s0
    };
    store
        .commit_send(&r1, &e2, Some(&s0_resent))
        .await
        .or_fail("commit_send")?;
    let what = "after a commit_send re-sending a message";
    session_is(store, &a1, &r1, what).await?;
    session_is(store, &a0, &r0b, what).await?;
    same(
        &format!("{what}: outbox()"),
        &store.outbox().await.or_fail("outbox")?,
        &vec![e0, e1, e2],
    )?;
    same(
        &format!("{what}: sent_messages() (updated in place)"),
        &store.sent_messages().await.or_fail("sent_messages")?,
        &vec![s0_resent, s1],
    )
}

async fn commit_send_many<S: Store>(store: &mut S) -> Outcome {
    let mut fx = Fixture::new()?;
    store.set_identity(&fx.me).await.or_fail("set_identity")?;
    let (a0, a1, a2) = (fx.address(0), fx.address(1), fx.address(2));
    let e9 = entry(a2, eid(9), vec![9; 10], NOW - 1);
    let r2 = fx.record(2)?;
    store
        .commit_send(&r2, &e9, None)
        .await
        .or_fail("commit_send")?;
    let (r0, r1) = (fx.record(0)?, fx.record(1)?);
    let (e0, e1) = (
        entry(a0, eid(0), vec![1; 40], NOW),
        entry(a1, eid(1), vec![2; 30], NOW),
    );
    let (s0, s1) = (
        sent(0, a0, DeliveryState::Stored, NOW),
        sent(1, a1, DeliveryState::Stored, NOW),
    );
    store
        .commit_send_many(&[
            (r1.clone(), e1.clone(), Some(s1.clone())),
            (r0.clone(), e0.clone(), Some(s0.clone())),
        ])
        .await
        .or_fail("commit_send_many")?;
    let what = "after commit_send_many";
    session_is(store, &a0, &r0, what).await?;
    session_is(store, &a1, &r1, what).await?;
    session_is(store, &a2, &r2, what).await?;
    same(
        &format!("{what}: outbox()"),
        &store.outbox().await.or_fail("outbox")?,
        &vec![e9, e1, e0],
    )?;
    let mut got = store.sent_messages().await.or_fail("sent_messages")?;
    got.sort_by_key(|m| m.id);
    let mut want = vec![s0, s1];
    want.sort_by_key(|m| m.id);
    same(&format!("{what}: sent_messages()"), &got, &want)
}

async fn commit_deposits<S: Store>(store: &mut S) -> Outcome {
    let mut fx = Fixture::new()?;
    store.set_identity(&fx.me).await.or_fail("set_identity")?;
    let (a0, a1, a2) = (fx.address(0), fx.address(1), fx.address(2));
    // Queued before the fan-out: a control frame (no sent message).
    let e9 = entry(a2, eid(9), vec![9; 10], NOW - 1);
    store
        .commit_send(&fx.record(2)?, &e9, None)
        .await
        .or_fail("commit_send")?;
    let (e0, e1, e2) = (
        entry(a0, eid(0), vec![1; 40], NOW),
        entry(a1, eid(1), vec![2; 30], NOW),
        entry(a2, eid(2), vec![3; 20], NOW),
    );
    let (s0, s1, s2) = (
        sent(0, a0, DeliveryState::Stored, NOW),
        sent(1, a1, DeliveryState::Stored, NOW),
        sent(2, a2, DeliveryState::Stored, NOW),
    );
    store
        .commit_send_many(&[
            (fx.record(0)?, e0.clone(), Some(s0.clone())),
            (fx.record(1)?, e1.clone(), Some(s1.clone())),
            (fx.record(2)?, e2.clone(), Some(s2.clone())),
        ])
        .await
        .or_fail("commit_send_many")?;
    let sorted = |mut v: Vec<SentMessage>| {
        v.sort_by_key(|m| m.id);
        v
    };

    store
        .commit_deposits(&[])
        .await
        .or_fail("commit_deposits")?;
    let what = "after an empty commit_deposits";
    same(
        &format!("{what}: outbox()"),
        &store.outbox().await.or_fail("outbox")?,
        &vec![e9.clone(), e0.clone(), e1.clone(), e2.clone()],
    )?;
    same(
        &format!("{what}: sent_messages()"),
        &sorted(store.sent_messages().await.or_fail("sent_messages")?),
        &sorted(vec![s0.clone(), s1.clone(), s2.clone()]),
    )?;

    // Copy 1 deposited, copy 0 refused for good (failed, body dropped), the
    // control frame deposited; copy 2 not deposited (stays, Stored).
    let s1_deposited = SentMessage {
        state: DeliveryState::Deposited,
        ..s1.clone()
    };
    let s0_failed = sent(0, a0, DeliveryState::Failed(Failure::Refused), NOW);
    store
        .commit_deposits(&[
            DepositDone {
                envelope: e1.envelope.id,
                sent: Some(s1_deposited.clone()),
            },
            DepositDone {
                envelope: e9.envelope.id,
                sent: None,
            },
            DepositDone {
                envelope: e0.envelope.id,
                sent: Some(s0_failed.clone()),
            },
        ])
        .await
        .or_fail("commit_deposits")?;
    let what = "after commit_deposits of 3 of 4 queued entries";
    same(
        &format!("{what}: outbox()"),
        &store.outbox().await.or_fail("outbox")?,
        &vec![e2.clone()],
    )?;
    same(
        &format!("{what}: sent_messages()"),
        &sorted(store.sent_messages().await.or_fail("sent_messages")?),
        &sorted(vec![s0_failed.clone(), s1_deposited, s2.clone()]),
    )?;

    // An envelope already gone (deposited again), with two states of one
    // message: the later wins; nothing else changes.
    let s1_resent = SentMessage {
        state: DeliveryState::Resent,
        sends: 2,
        last_sent: NOW + 5,
        ..s1.clone()
    };
    let s1_delivered = sent(1, a1, DeliveryState::Delivered, NOW);
    store
        .commit_deposits(&[
            DepositDone {
                envelope: e1.envelope.id,
                sent: Some(s1_resent),
            },
            DepositDone {
                envelope: e1.envelope.id,
                sent: Some(s1_delivered.clone()),
            },
        ])
        .await
        .or_fail("commit_deposits")?;
    let what = "after commit_deposits of an envelope no longer queued";
    same(
        &format!("{what}: outbox()"),
        &store.outbox().await.or_fail("outbox")?,
        &vec![e2],
    )?;
    same(
        &format!("{what}: sent_messages()"),
        &sorted(store.sent_messages().await.or_fail("sent_messages")?),
        &sorted(vec![s0_failed, s1_delivered, s2]),
    )
}

fn account_record(k: u8, trust: Trust, evidence: bool) -> AccountRecord {
    AccountRecord {
        account: AccountId([k; 32]),
        head: vec![k; 200],
        parent: (k % 2 == 0).then(|| vec![k ^ 0xff; 110]),
        trust,
        evidence: evidence.then(|| (vec![1; AccountRecord::MAX_LIST], vec![2; 74])),
        updated_at: NOW + u64::from(k),
    }
}

async fn accounts<S: Store>(store: &mut S) -> Outcome {
    same(
        "a new store: own_account()",
        &store.own_account().await.or_fail("own_account")?,
        &None,
    )?;
    let own = account_record(5, Trust::Validated, false);
    store
        .set_own_account(&own)
        .await
        .or_fail("set_own_account")?;
    same(
        "own_account()",
        &store.own_account().await.or_fail("own_account")?,
        &Some(own.clone()),
    )?;
    let c1 = account_record(9, Trust::Unvalidated, false);
    let c0 = account_record(2, Trust::Compromised, true);
    store.set_account(&c1).await.or_fail("set_account")?;
    store.set_account(&c0).await.or_fail("set_account")?;
    same(
        "account()",
        &store.account(&c0.account).await.or_fail("account")?,
        &Some(c0.clone()),
    )?;
    same(
        "account() of the own account (not a contact)",
        &store.account(&own.account).await.or_fail("account")?,
        &None,
    )?;
    same(
        "accounts()",
        &store.accounts().await.or_fail("accounts")?,
        &vec![c0.clone(), c1.clone()],
    )?;
    let c1b = AccountRecord {
        trust: Trust::Validated,
        head: vec![3; 300],
        ..c1
    };
    store.set_account(&c1b).await.or_fail("set_account")?;
    same(
        "accounts() after a replacement",
        &store.accounts().await.or_fail("accounts")?,
        &vec![c0, c1b],
    )?;
    let own2 = account_record(7, Trust::Validated, false);
    store
        .set_own_account(&own2)
        .await
        .or_fail("set_own_account")?;
    same(
        "own_account() after a replacement",
        &store.own_account().await.or_fail("own_account")?,
        &Some(own2),
    )
}

async fn pairing<S: Store>(store: &mut S) -> Outcome {
    same(
        "a new store: pairing()",
        &store.pairing().await.or_fail("pairing")?,
        &None,
    )?;
    let first = PairingRecord {
        code: Zeroizing::new([0x5a; 16]),
        created_at: 1_000,
        expires_at: 1_600,
    };
    store
        .set_pairing(Some(&first))
        .await
        .or_fail("set_pairing")?;
    same(
        "pairing()",
        &store.pairing().await.or_fail("pairing")?,
        &Some(first.clone()),
    )?;
    let second = PairingRecord {
        code: Zeroizing::new([
            0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0xfe, 0xdc, 0xba, 0x98, 0x76, 0x54,
            0x32, 0x10,
        ]),
        created_at: u64::MAX - 600,
        expires_at: u64::MAX,
    };
    store
        .set_pairing(Some(&second))
        .await
        .or_fail("set_pairing")?;
    same(
        "pairing() after a second offer",
        &store.pairing().await.or_fail("pairing")?,
        &Some(second),
    )?;
    store.set_pairing(None).await.or_fail("set_pairing(None)")?;
    same(
        "pairing() after set_pairing(None)",
        &store.pairing().await.or_fail("pairing")?,
        &None,
    )?;
    store
        .set_pairing(None)
        .await
        .or_fail("set_pairing(None) without an offer")?;
    same(
        "pairing() after a second set_pairing(None)",
        &store.pairing().await.or_fail("pairing")?,
        &None,
    )
}

async fn outbox<S: Store>(store: &mut S) -> Outcome {
    let mut fx = Fixture::new()?;
    store.set_identity(&fx.me).await.or_fail("set_identity")?;
    let mut entries = Vec::new();
    for k in 0..4u8 {
        let i = usize::from(k) % 3;
        let e = entry(
            fx.address(i),
            eid(k),
            vec![k; 10 + usize::from(k)],
            NOW + u64::from(k),
        );
        let record = fx.record(i)?;
        store
            .commit_send(&record, &e, None)
            .await
            .or_fail("commit_send")?;
        entries.push(e);
    }
    same(
        "outbox() (commit order)",
        &store.outbox().await.or_fail("outbox")?,
        &entries,
    )?;
    store
        .remove_outbox(&entries[1].envelope.id)
        .await
        .or_fail("remove_outbox")?;
    entries.remove(1);
    same(
        "outbox() after remove_outbox",
        &store.outbox().await.or_fail("outbox")?,
        &entries,
    )?;
    store
        .remove_outbox(&eid(200))
        .await
        .or_fail("remove_outbox")?;
    same(
        "outbox() after removing an unknown id",
        &store.outbox().await.or_fail("outbox")?,
        &entries,
    )?;
    for e in &entries {
        store
            .remove_outbox(&e.envelope.id)
            .await
            .or_fail("remove_outbox")?;
    }
    same(
        "outbox() after removing every entry",
        &store.outbox().await.or_fail("outbox")?,
        &Vec::new(),
    )
}

async fn processed<S: Store>(store: &mut S) -> Outcome {
    let times = [NOW - 10, NOW - 1, NOW, NOW + 5];
    let batch: Vec<ReceiveCommit<'_>> = (0..4u8)
        .map(|k| mark(eid(k), times[usize::from(k)]))
        .collect();
    let marks = async |store: &S| -> Result<Vec<bool>, String> {
        let mut one_by_one: Vec<bool> = Vec::new();
        for k in 0..5u8 {
            one_by_one.push(store.is_processed(&eid(k)).await.or_fail("is_processed")?);
        }
        // processed_among answers the same, in order, for any number of
        // ids (201 here: batching stores split and pad their queries).
        let ids: Vec<EnvelopeId> = (0..=200u8).map(eid).collect();
        let among = store
            .processed_among(&ids)
            .await
            .or_fail("processed_among")?;
        let mut expected = one_by_one.clone();
        expected.resize(ids.len(), false);
        same("processed_among() beside is_processed()", &among, &expected)?;
        Ok(one_by_one)
    };
    store
        .commit_receive(&batch)
        .await
        .or_fail("commit_receive")?;
    same(
        "is_processed() of four envelopes committed and one not",
        &marks(store).await?,
        &vec![true, true, true, true, false],
    )?;
    store.prune_processed(0).await.or_fail("prune_processed")?;
    same(
        "is_processed() after prune_processed(0)",
        &marks(store).await?,
        &vec![true, true, true, true, false],
    )?;
    store
        .prune_processed(NOW)
        .await
        .or_fail("prune_processed")?;
    same(
        "is_processed() after prune_processed(before) (marks at NOW-10, NOW-1, NOW, NOW+5; \
         before = NOW: those older than before go, the one at before stays)",
        &marks(store).await?,
        &vec![false, false, true, true, false],
    )?;
    // A mark set again after pruning.
    store
        .commit_receive(&[mark(eid(0), NOW + 1)])
        .await
        .or_fail("commit_receive")?;
    store
        .prune_processed(NOW + 1)
        .await
        .or_fail("prune_processed")?;
    same(
        "is_processed() after marking again and prune_processed(NOW + 1)",
        &marks(store).await?,
        &vec![true, false, false, true, false],
    )
}

async fn commit_receive<S: Store>(store: &mut S) -> Outcome {
    let mut fx = Fixture::new()?;
    store.set_identity(&fx.me).await.or_fail("set_identity")?;
    let (a0, a1) = (fx.address(0), fx.address(1));

    // Before: prekeys, a known peer, a message awaiting its receipt.
    store
        .set_prekeys(&fx.prekeys)
        .await
        .or_fail("set_prekeys")?;
    let p1 = PeerRecord {
        address: a1,
        trust: Trust::Unvalidated,
        first_seen: NOW - 100,
    };
    store.set_peer(&p1).await.or_fail("set_peer")?;
    let waiting = sent(0, a0, DeliveryState::Deposited, NOW - 50);
    store.update_sent(&waiting).await.or_fail("update_sent")?;
    store
        .set_peer_excluded(&a1, true)
        .await
        .or_fail("set_peer_excluded")?;
    let (k0, k0b, k1) = (access(1, 0xa0), access(2, 0xa1), access(9, 0xa9));

    // The batch: two envelopes from peer 0 (the second session record
    // wins), one from peer 1, a mark alone.
    let r0 = fx.record(0)?;
    let r0b = fx.record(0)?;
    let r1 = fx.record(1)?;
    let mut prekeys1 = fx.prekeys.clone();
    let used = prekeys1.prekeys.one_time_prekeys().next().map(|k| k.id());
    if let Some(id) = used {
        prekeys1.prekeys.remove_one_time_prekey(id);
    }
    prekeys1.accepted.push((1, [0xb0; 16]));
    let mut prekeys2 = prekeys1.clone();
    prekeys2.accepted.push((1, [0xb1; 16]));
    let p0 = PeerRecord {
        address: a0,
        trust: Trust::Unvalidated,
        first_seen: NOW,
    };
    let p1v = PeerRecord {
        trust: Trust::Validated,
        ..p1.clone()
    };
    let m0 = message(eid(0), a0, b"first", NOW);
    let m1 = message(eid(1), a0, b"second", NOW + 1);
    let m2 = message(eid(2), a1, b"third", NOW + 2);
    let delivered = SentMessage {
        body: Vec::new(),
        state: DeliveryState::Delivered,
        ..waiting.clone()
    };
    let new = sent(1, a1, DeliveryState::Stored, NOW + 1);
    let new_deposited = SentMessage {
        state: DeliveryState::Deposited,
        ..new.clone()
    };
    let batch = [
        ReceiveCommit {
            envelope_id: eid(0),
            processed_at: NOW,
            session: Some((&a0, &r0)),
            prekeys: Some(&prekeys1),
            peer: Some(&p0),
            message: Some(&m0),
            sent: Some(&delivered),
            access: Some((&a0, &k0)),
        },
        ReceiveCommit {
            envelope_id: eid(1),
            processed_at: NOW + 1,
            session: Some((&a0, &r0b)),
            prekeys: None,
            peer: None,
            message: Some(&m1),
            sent: Some(&new),
            access: Some((&a0, &k0b)),
        },
        ReceiveCommit {
            envelope_id: eid(2),
            processed_at: NOW + 2,
            session: Some((&a1, &r1)),
            prekeys: Some(&prekeys2),
            peer: Some(&p1v),
            message: Some(&m2),
            sent: Some(&new_deposited),
            access: Some((&a1, &k1)),
        },
        mark(eid(3), NOW + 3),
    ];
    store
        .commit_receive(&batch)
        .await
        .or_fail("commit_receive")?;

    let check = async |store: &S, what: &str| -> Outcome {
        let got = store.session(&a0).await.or_fail("session")?;
        let got = got.ok_or_else(|| format!("{what}: peer 0's session record is missing"))?;
        same_record(
            &format!("{what}: session() of a peer changed twice (the later record wins)"),
            &got,
            &r0b,
        )?;
        session_is(store, &a1, &r1, what).await?;
        let got = store.prekeys().await.or_fail("prekeys")?;
        let got = got.ok_or_else(|| format!("{what}: the prekeys are missing"))?;
        same_prekeys(
            &format!("{what}: prekeys() (the later state wins)"),
            &got,
            &prekeys2,
        )?;
        same(
            &format!("{what}: peer() of a new peer"),
            &store.peer(&a0).await.or_fail("peer")?,
            &Some(p0.clone()),
        )?;
        same(
            &format!("{what}: peer() of an updated peer"),
            &store.peer(&a1).await.or_fail("peer")?,
            &Some(p1v.clone()),
        )?;
        same(
            &format!("{what}: peer_access() of a peer whose key came twice (the later wins)"),
            &store.peer_access(&a0).await.or_fail("peer_access")?,
            &PeerAccess {
                key: Some(k0b.clone()),
                excluded: false,
            },
        )?;
        same(
            &format!("{what}: peer_access() of an excluded peer (the key set, still excluded)"),
            &store.peer_access(&a1).await.or_fail("peer_access")?,
            &PeerAccess {
                key: Some(k1.clone()),
                excluded: true,
            },
        )?;
        same(
            &format!("{what}: inbox()"),
            &store.inbox().await.or_fail("inbox")?,
            &vec![m0.clone(), m1.clone(), m2.clone()],
        )?;
        same(
            &format!(
                "{what}: sent_messages() (a receipt for the known one, a new one \
                 changed twice: its later state, in its first position)"
            ),
            &store.sent_messages().await.or_fail("sent_messages")?,
            &vec![delivered.clone(), new_deposited.clone()],
        )?;
        let mut marks: Vec<bool> = Vec::new();
        for k in 0..5u8 {
            marks.push(store.is_processed(&eid(k)).await.or_fail("is_processed")?);
        }
        same(
            &format!("{what}: is_processed() of the four envelopes and another"),
            &marks,
            &vec![true, true, true, true, false],
        )?;
        same(
            &format!("{what}: outbox()"),
            &store.outbox().await.or_fail("outbox")?,
            &Vec::new(),
        )
    };
    check(store, "after commit_receive").await?;
    store.commit_receive(&[]).await.or_fail("commit_receive")?;
    check(store, "after an empty commit_receive").await
}

async fn inbox<S: Store>(store: &mut S) -> Outcome {
    let fx = Fixture::new()?;
    let (a0, a1) = (fx.address(0), fx.address(1));
    let m0 = message(eid(0), a0, b"zero", NOW);
    let m1 = message(eid(1), a1, b"", NOW + 1);
    let m0_again = message(eid(0), a0, b"a duplicate, ignored", NOW + 2);
    let m2 = message(eid(2), a0, &[0xee; 3000], NOW + 3);
    let m1_again = message(eid(1), a1, b"another duplicate", NOW + 4);
    let m3 = message(eid(3), a1, b"three", NOW + 5);
    let batch: Vec<ReceiveCommit<'_>> =
        [&m0, &m1, &m0_again, &m2].into_iter().map(commit).collect();
    store
        .commit_receive(&batch)
        .await
        .or_fail("commit_receive")?;
    same(
        "inbox() (the order received, a duplicate in the batch ignored)",
        &store.inbox().await.or_fail("inbox")?,
        &vec![m0.clone(), m1.clone(), m2.clone()],
    )?;
    let batch: Vec<ReceiveCommit<'_>> = [&m1_again, &m3].into_iter().map(commit).collect();
    store
        .commit_receive(&batch)
        .await
        .or_fail("commit_receive")?;
    let mut want = vec![m0, m1, m2, m3];
    same(
        "inbox() after a second batch (a duplicate of an earlier one ignored)",
        &store.inbox().await.or_fail("inbox")?,
        &want,
    )?;
    store.remove_inbox(&eid(1)).await.or_fail("remove_inbox")?;
    want.remove(1);
    same(
        "inbox() after remove_inbox",
        &store.inbox().await.or_fail("inbox")?,
        &want,
    )?;
    store
        .remove_inbox(&eid(200))
        .await
        .or_fail("remove_inbox")?;
    same(
        "inbox() after removing an unknown id",
        &store.inbox().await.or_fail("inbox")?,
        &want,
    )?;
    for m in &want {
        store
            .remove_inbox(&m.envelope_id)
            .await
            .or_fail("remove_inbox")?;
    }
    same(
        "inbox() after removing every message",
        &store.inbox().await.or_fail("inbox")?,
        &Vec::new(),
    )
}

async fn sent_messages<S: Store>(store: &mut S) -> Outcome {
    let fx = Fixture::new()?;
    let states = [
        DeliveryState::Stored,
        DeliveryState::Deposited,
        DeliveryState::Resent,
        DeliveryState::Delivered,
        DeliveryState::Failed(Failure::TimedOut),
        DeliveryState::Failed(Failure::Compromised),
        DeliveryState::Failed(Failure::Refused),
        // Later ones to peers 1 and 2: the newest pending one to peer 1,
        // a delivered one (never a "last pending") to peer 2.
        DeliveryState::Stored,
        DeliveryState::Delivered,
    ];
    let mut all: Vec<SentMessage> = states
        .iter()
        .enumerate()
        .map(|(k, state)| {
            let k8 = k as u8;
            SentMessage {
                last_sent: NOW + 10 + k as u64,
                sends: k as u32 + 1,
                ..sent(k8, fx.address(k % 3), *state, NOW + k as u64)
            }
        })
        .collect();
    for m in &all {
        store.update_sent(m).await.or_fail("update_sent")?;
    }
    let check = async |store: &S, all: &[SentMessage], what: &str| -> Outcome {
        same(
            &format!("{what}: sent_messages() (the order first stored)"),
            &store.sent_messages().await.or_fail("sent_messages")?,
            &all.to_vec(),
        )?;
        for m in all {
            same(
                &format!("{what}: sent_message({:?})", m.id),
                &store.sent_message(&m.id).await.or_fail("sent_message")?,
                &Some(m.clone()),
            )?;
        }
        same(
            &format!("{what}: sent_message() of an unknown id"),
            &store
                .sent_message(&mid(200))
                .await
                .or_fail("sent_message")?,
            &None,
        )?;
        let pending: Vec<SentMessage> = all
            .iter()
            .filter(|m| m.state.is_pending())
            .cloned()
            .collect();
        same(
            &format!("{what}: pending_sent()"),
            &store.pending_sent().await.or_fail("pending_sent")?,
            &pending,
        )?;
        let nobody = DeviceAddress {
            identity: [0x77; 32],
            device_id: 9,
        };
        for (k, to) in (0..3).map(|k| fx.address(k)).chain([nobody]).enumerate() {
            let want = pending.iter().rev().find(|m| m.to == to).map(|m| m.id);
            same(
                &format!("{what}: last_pending_to(peer {k})"),
                &store
                    .last_pending_to(&to)
                    .await
                    .or_fail("last_pending_to")?,
                &want,
            )?;
        }
        Ok(())
    };
    check(store, &all, "after update_sent").await?;

    // Updates in place: a re-send, a receipt.
    all[1] = SentMessage {
        state: DeliveryState::Resent,
        last_sent: NOW + 100,
        sends: all[1].sends + 1,
        ..all[1].clone()
    };
    all[0] = SentMessage {
        body: Vec::new(),
        state: DeliveryState::Delivered,
        ..all[0].clone()
    };
    store.update_sent(&all[1]).await.or_fail("update_sent")?;
    store.update_sent(&all[0]).await.or_fail("update_sent")?;
    check(store, &all, "after updating two messages").await
}

async fn prune_sent<S: Store>(store: &mut S) -> Outcome {
    let fx = Fixture::new()?;
    let to = fx.address(0);
    // (state, created, kept by prune_sent(NOW))
    let cases = [
        (DeliveryState::Stored, 0, true),
        (DeliveryState::Delivered, NOW - 1, false),
        (DeliveryState::Deposited, 5, true),
        (DeliveryState::Failed(Failure::TimedOut), 5, false),
        (DeliveryState::Delivered, NOW, true),
        (DeliveryState::Resent, NOW - 100, true),
        (DeliveryState::Failed(Failure::Refused), NOW + 1, true),
        (DeliveryState::Failed(Failure::Compromised), NOW - 1, false),
    ];
    let all: Vec<SentMessage> = cases
        .iter()
        .enumerate()
        .map(|(k, (state, created, _))| sent(k as u8, to, *state, *created))
        .collect();
    for m in &all {
        store.update_sent(m).await.or_fail("update_sent")?;
    }
    store.prune_sent(NOW).await.or_fail("prune_sent")?;
    for (m, (_, _, kept)) in all.iter().zip(cases) {
        let present = store
            .sent_message(&m.id)
            .await
            .or_fail("sent_message")?
            .is_some();
        if m.state.is_pending() {
            ensure!(
                present,
                "prune_sent(before) removed a pending message ({:?}, created {} < before = {NOW}): \
                 pending messages are never pruned",
                m.state,
                m.created
            );
        } else if kept {
            ensure!(
                present,
                "prune_sent(before) removed a {:?} message created at or after before \
                 ({} >= {NOW})",
                m.state,
                m.created
            );
        } else {
            ensure!(
                !present,
                "prune_sent(before) kept a {:?} message created before before ({} < {NOW})",
                m.state,
                m.created
            );
        }
    }
    let kept: Vec<SentMessage> = all
        .iter()
        .zip(cases)
        .filter(|(_, (_, _, kept))| *kept)
        .map(|(m, _)| m.clone())
        .collect();
    same(
        "sent_messages() after prune_sent(before)",
        &store.sent_messages().await.or_fail("sent_messages")?,
        &kept,
    )?;
    store.prune_sent(u64::MAX).await.or_fail("prune_sent")?;
    let pending: Vec<SentMessage> = all
        .iter()
        .filter(|m| m.state.is_pending())
        .cloned()
        .collect();
    same(
        "sent_messages() after prune_sent(u64::MAX) (only the pending ones stay)",
        &store.sent_messages().await.or_fail("sent_messages")?,
        &pending,
    )
}

async fn u64_times<S: Store>(store: &mut S) -> Outcome {
    let mut fx = Fixture::new()?;
    store.set_identity(&fx.me).await.or_fail("set_identity")?;
    let (a0, a1) = (fx.address(0), fx.address(1));
    let big = [i64::MAX as u64, 1 << 63, u64::MAX - 1, u64::MAX];

    // Peers.
    let peers: Vec<PeerRecord> = big
        .iter()
        .enumerate()
        .map(|(k, t)| PeerRecord {
            address: DeviceAddress {
                identity: a0.identity,
                device_id: 50 + k as u32,
            },
            trust: Trust::Validated,
            first_seen: *t,
        })
        .collect();
    for p in &peers {
        store.set_peer(p).await.or_fail("set_peer")?;
    }
    for p in &peers {
        same(
            &format!("peer() with first_seen = {}", p.first_seen),
            &store.peer(&p.address).await.or_fail("peer")?,
            &Some(p.clone()),
        )?;
    }

    // A session record whose times and generation are the largest.
    let mut record = fx.record(0)?;
    for e in record.entries_mut() {
        e.generation = u64::MAX;
        e.created = u64::MAX;
        e.last_received = 1 << 63;
    }
    let e = entry(a0, eid(0), vec![9; 20], u64::MAX);
    let s = SentMessage {
        last_sent: u64::MAX,
        sends: u32::MAX,
        ..sent(0, a0, DeliveryState::Resent, 1 << 63)
    };
    store
        .commit_send(&record, &e, Some(&s))
        .await
        .or_fail("commit_send")?;
    session_is(store, &a0, &record, "with times of u64::MAX").await?;
    same(
        "outbox() with created = u64::MAX",
        &store.outbox().await.or_fail("outbox")?,
        &vec![e],
    )?;
    same(
        "sent_message() with created = 2^63, last_sent = u64::MAX, sends = u32::MAX",
        &store.sent_message(&s.id).await.or_fail("sent_message")?,
        &Some(s.clone()),
    )?;

    // Received at, processed at.
    let m = message(eid(1), a1, b"late", u64::MAX);
    let times = [0, 5, NOW, big[0], big[1], big[2], big[3]];
    let mut batch: Vec<ReceiveCommit<'_>> = times
        .iter()
        .enumerate()
        .map(|(k, t)| mark(eid(10 + k as u8), *t))
        .collect();
    batch.push(ReceiveCommit {
        message: Some(&m),
        ..mark(eid(1), u64::MAX)
    });
    store
        .commit_receive(&batch)
        .await
        .or_fail("commit_receive")?;
    same(
        "inbox() with received_at = u64::MAX",
        &store.inbox().await.or_fail("inbox")?,
        &vec![m],
    )?;
    let marks = async |store: &S| -> Result<Vec<bool>, String> {
        let mut out = Vec::new();
        for k in 0..times.len() {
            out.push(
                store
                    .is_processed(&eid(10 + k as u8))
                    .await
                    .or_fail("is_processed")?,
            );
        }
        Ok(out)
    };
    store.prune_processed(6).await.or_fail("prune_processed")?;
    same(
        "is_processed() after prune_processed(6) (marks at 0, 5, NOW, 2^63-1, 2^63, \
         u64::MAX-1, u64::MAX)",
        &marks(store).await?,
        &vec![false, false, true, true, true, true, true],
    )?;
    store
        .prune_processed(1 << 63)
        .await
        .or_fail("prune_processed")?;
    same(
        "is_processed() after prune_processed(2^63) (marks at 0, 5, NOW, 2^63-1, 2^63, \
         u64::MAX-1, u64::MAX)",
        &marks(store).await?,
        &vec![false, false, false, false, true, true, true],
    )?;
    store
        .prune_processed(u64::MAX)
        .await
        .or_fail("prune_processed")?;
    same(
        "is_processed() after prune_processed(u64::MAX)",
        &marks(store).await?,
        &vec![false, false, false, false, false, false, true],
    )?;

    // Finished sent messages on both sides of 2^63.
    let finished: Vec<SentMessage> = big
        .iter()
        .enumerate()
        .map(|(k, t)| sent(10 + k as u8, a1, DeliveryState::Delivered, *t))
        .collect();
    for m in &finished {
        store.update_sent(m).await.or_fail("update_sent")?;
    }
    store
        .prune_sent((1 << 63) + 1)
        .await
        .or_fail("prune_sent")?;
    same(
        "sent_messages() after prune_sent(2^63 + 1) (delivered ones created at 2^63-1, 2^63, \
         u64::MAX-1, u64::MAX, and a pending one at 2^63)",
        &store.sent_messages().await.or_fail("sent_messages")?,
        &vec![s.clone(), finished[2].clone(), finished[3].clone()],
    )?;

    // Quarantined at.
    store
        .quarantine_session(&a0, u64::MAX, "late")
        .await
        .or_fail("quarantine_session")?;
    let q: Vec<(DeviceAddress, u64)> = store
        .quarantined()
        .await
        .or_fail("quarantined")?
        .into_iter()
        .map(|q| (q.peer, q.at))
        .collect();
    same("quarantined() at u64::MAX", &q, &vec![(a0, u64::MAX)])
}

/// What the routing methods must answer for `stored` (every record the
/// store holds, by peer).
async fn routes_are<S: Store>(
    store: &S,
    stored: &[(DeviceAddress, &SessionRecord)],
    probe: &[(DeviceAddress, &SessionRecord)],
    when: &str,
) -> Outcome {
    let sorted = |mut v: Vec<DeviceAddress>| {
        v.sort_unstable();
        v.dedup();
        v
    };
    // Each record's keys, one by one and all at once.
    for (address, record) in probe {
        let keys: Vec<[u8; 32]> = record.ratchet_keys().collect();
        ensure!(
            !keys.is_empty(),
            "building the test data: a record without keys"
        );
        let want = sorted(
            stored
                .iter()
                .filter(|(_, r)| r.ratchet_keys().any(|k| keys.contains(&k)))
                .map(|(a, _)| *a)
                .collect(),
        );
        let got = sorted(
            store
                .route_ratchet_keys(&keys)
                .await
                .or_fail("route_ratchet_keys")?,
        );
        ensure!(
            got == want,
            "{when}: route_ratchet_keys(the keys of {}'s record) found [{}], expected [{}]",
            name(address),
            got.iter().map(name).collect::<Vec<_>>().join(", "),
            want.iter().map(name).collect::<Vec<_>>().join(", ")
        );
    }
    let all: Vec<[u8; 32]> = probe.iter().flat_map(|(_, r)| r.ratchet_keys()).collect();
    let want = sorted(
        stored
            .iter()
            .filter(|(_, r)| r.ratchet_keys().any(|k| all.contains(&k)))
            .map(|(a, _)| *a)
            .collect(),
    );
    let got = sorted(
        store
            .route_ratchet_keys(&all)
            .await
            .or_fail("route_ratchet_keys")?,
    );
    ensure!(
        got == want,
        "{when}: route_ratchet_keys(every key) found {} peers, expected {}",
        got.len(),
        want.len()
    );
    let none = store
        .route_ratchet_keys(&[[0x5a; 32]])
        .await
        .or_fail("route_ratchet_keys")?;
    ensure!(
        none.is_empty(),
        "{when}: route_ratchet_keys(a key no record has) found {} peers",
        none.len()
    );
    let want = sorted(
        stored
            .iter()
            .filter(|(_, r)| r.awaits_ratchet_key())
            .map(|(a, _)| *a)
            .collect(),
    );
    let got = sorted(
        store
            .awaiting_ratchet_key()
            .await
            .or_fail("awaiting_ratchet_key")?,
    );
    ensure!(
        got == want,
        "{when}: awaiting_ratchet_key() lists [{}], expected [{}]",
        got.iter().map(name).collect::<Vec<_>>().join(", "),
        want.iter().map(name).collect::<Vec<_>>().join(", ")
    );
    for (address, _) in probe {
        let want = sorted(
            stored
                .iter()
                .filter(|(a, _)| a.identity == address.identity)
                .map(|(a, _)| *a)
                .collect(),
        );
        let found = store
            .sessions_with_identity(&address.identity)
            .await
            .or_fail("sessions_with_identity")?;
        for (a, r) in &found {
            let r = r
                .as_ref()
                .map_err(|e| format!("{when}: sessions_with_identity: {}: {e}", name(a)))?;
            let stored = stored.iter().find(|(s, _)| s == a).map(|(_, r)| *r);
            match stored {
                Some(s) => same_record(
                    &format!("{when}: sessions_with_identity, {}", name(a)),
                    r,
                    s,
                )?,
                None => ensure!(false, "{when}: sessions_with_identity lists {}", name(a)),
            }
        }
        let got = sorted(found.into_iter().map(|(a, _)| a).collect());
        ensure!(
            got == want,
            "{when}: sessions_with_identity(identity of {}) lists [{}], expected [{}]",
            name(address),
            got.iter().map(name).collect::<Vec<_>>().join(", "),
            want.iter().map(name).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}

async fn routes<S: Store>(store: &mut S) -> Outcome {
    let mut fx = Fixture::new()?;
    store.set_identity(&fx.me).await.or_fail("set_identity")?;
    let (a0, a1, a2) = (fx.address(0), fx.address(1), fx.address(2));
    // A second device of peer 0's identity key.
    let a0b = DeviceAddress {
        identity: a0.identity,
        device_id: a0.device_id + 100,
    };
    let r0 = fx.record(0)?;
    let r0b = fx.two_sessions(0)?;
    let r1 = fx.two_sessions(1)?;
    let r2 = fx.record(2)?;
    let (a3, r3) = fx.responder()?;
    ensure!(
        r0.awaits_ratchet_key() && !r3.awaits_ratchet_key(),
        "building the test data: awaiting flags"
    );
    let probe = [(a0, &r0), (a0b, &r0b), (a1, &r1), (a2, &r2), (a3, &r3)];
    routes_are(store, &[], &probe, "empty store").await?;

    store.set_session(&a0, &r0).await.or_fail("set_session")?;
    store.set_session(&a0b, &r0b).await.or_fail("set_session")?;
    store.set_session(&a3, &r3).await.or_fail("set_session")?;
    let mut stored = vec![(a0, &r0), (a0b, &r0b), (a3, &r3)];
    routes_are(store, &stored, &probe, "after set_session").await?;

    // Replaced: the old record's keys lead nowhere.
    let empty = SessionRecord::new();
    store
        .set_session(&a3, &empty)
        .await
        .or_fail("set_session")?;
    stored.retain(|(a, _)| *a != a3);
    stored.push((a3, &empty));
    routes_are(
        store,
        &stored,
        &probe,
        "after set_session replaced a record",
    )
    .await?;

    let e = entry(a1, eid(1), b"sealed".to_vec(), NOW);
    store
        .commit_send(&r1, &e, None)
        .await
        .or_fail("commit_send")?;
    stored.push((a1, &r1));
    routes_are(store, &stored, &probe, "after commit_send").await?;

    let batch = [ReceiveCommit {
        session: Some((&a2, &r2)),
        ..mark(eid(2), NOW)
    }];
    store
        .commit_receive(&batch)
        .await
        .or_fail("commit_receive")?;
    stored.push((a2, &r2));
    routes_are(store, &stored, &probe, "after commit_receive").await?;

    // commit_receive replacing a record with another.
    let r2b = fx.record(2)?;
    let batch = [ReceiveCommit {
        session: Some((&a2, &r2b)),
        ..mark(eid(3), NOW)
    }];
    store
        .commit_receive(&batch)
        .await
        .or_fail("commit_receive")?;
    stored.retain(|(a, _)| *a != a2);
    stored.push((a2, &r2b));
    let probe2 = [(a0, &r0), (a0b, &r0b), (a1, &r1), (a2, &r2b), (a3, &r3)];
    routes_are(
        store,
        &stored,
        &probe2,
        "after commit_receive replaced a record",
    )
    .await?;

    store.remove_session(&a0b).await.or_fail("remove_session")?;
    stored.retain(|(a, _)| *a != a0b);
    routes_are(store, &stored, &probe2, "after remove_session").await?;

    store
        .quarantine_session(&a1, NOW, "test")
        .await
        .or_fail("quarantine_session")?;
    stored.retain(|(a, _)| *a != a1);
    routes_are(store, &stored, &probe2, "after quarantine_session").await
}

// ---------------------------------------------------------------------------
// Atomicity under injected failures.

/// An encoding that holds private keys (wiped on drop, redacted in Debug).
type Secret = Zeroizing<Vec<u8>>;

/// Everything the atomicity check compares before and after a failed
/// commit: records by their encoding, the rest as read.
#[derive(PartialEq, Debug)]
struct Snapshot {
    /// Encodings that hold private keys: wiped when the snapshot drops.
    prekeys: Option<Secret>,
    sessions: Vec<(DeviceAddress, Result<Secret, String>)>,
    quarantined: usize,
    peers: Vec<PeerRecord>,
    outbox: Vec<OutboxEntry>,
    sent: Vec<SentMessage>,
    inbox: Vec<InboxMessage>,
    processed: Vec<bool>,
    routes: Vec<DeviceAddress>,
    awaiting: Vec<DeviceAddress>,
    /// The access of the peers the atomicity check writes.
    access: Vec<PeerAccess>,
}

async fn snapshot<S: Store>(
    store: &S,
    ids: &[EnvelopeId],
    keys: &[[u8; 32]],
) -> Result<Snapshot, String> {
    let mut sessions: Vec<(DeviceAddress, Result<Secret, String>)> = store
        .sessions()
        .await
        .or_fail("sessions")?
        .into_iter()
        .map(|(a, r)| (a, r.map(|r| r.to_bytes()).map_err(|e| e.to_string())))
        .collect();
    sessions.sort_by_key(|(a, _)| *a);
    let mut routes = store
        .route_ratchet_keys(keys)
        .await
        .or_fail("route_ratchet_keys")?;
    routes.sort_unstable();
    let mut awaiting = store
        .awaiting_ratchet_key()
        .await
        .or_fail("awaiting_ratchet_key")?;
    awaiting.sort_unstable();
    let mut access = Vec::new();
    for a in &sessions_of_interest(&sessions) {
        access.push(store.peer_access(a).await.or_fail("peer_access")?);
    }
    Ok(Snapshot {
        prekeys: store
            .prekeys()
            .await
            .or_fail("prekeys")?
            .map(|p| p.to_bytes()),
        sessions,
        quarantined: store.quarantined().await.or_fail("quarantined")?.len(),
        peers: sorted(store.peers().await.or_fail("peers")?),
        outbox: store.outbox().await.or_fail("outbox")?,
        sent: store.sent_messages().await.or_fail("sent_messages")?,
        inbox: store.inbox().await.or_fail("inbox")?,
        processed: store
            .processed_among(ids)
            .await
            .or_fail("processed_among")?,
        routes,
        awaiting,
        access,
    })
}

/// The peers whose access a snapshot reads: those with a session record
/// (the atomicity check gives every peer it writes one).
fn sessions_of_interest(
    sessions: &[(DeviceAddress, Result<Secret, String>)],
) -> Vec<DeviceAddress> {
    sessions.iter().map(|(a, _)| *a).collect()
}

/// The most write failures the atomicity check injects per commit (a
/// commit that still fails at the last one is a violation: the store never
/// completes it).
pub const MAX_INJECTED_WRITE: u32 = 400;

/// `atomicity`: [`Store::commit_send`], [`Store::commit_receive`],
/// [`Store::quarantine_session`] and [`Store::commit_send_many`] apply all their changes or none, whatever
/// write fails. For `n = 0, 1, 2, ...` the check asks `inject(store,
/// Some(n))` to make the `n`-th write from then on fail (0: the first) and
/// runs the commit: while it fails, everything the trait shows must be as
/// before it (records, prekeys, peers, outbox, sent messages, inbox,
/// processed marks, routes, quarantine, the access of the peers with a
/// record); once it succeeds (the fault came
/// after its last write), everything must be as after it. `inject(store,
/// None)` removes the fault. How a write is made to fail is the
/// implementation's (SQLite: a trigger that raises on the `n`-th row
/// written; the crate's `tests/store_conformance.rs` has it); a store that
/// cannot fail (in memory) passes an `inject` that does nothing, and its
/// first attempt succeeds.
///
/// The store must be empty (fresh).
///
/// # Errors
/// A [`Violation`] naming `atomicity` and what was wrong.
pub async fn check_atomicity<S: Store>(
    store: &mut S,
    inject: impl FnMut(&mut S, Option<u32>),
) -> Result<(), Violation> {
    atomicity(store, inject).await.map_err(|message| Violation {
        check: "atomicity",
        message,
    })
}

async fn atomicity<S: Store>(
    store: &mut S,
    mut inject: impl FnMut(&mut S, Option<u32>),
) -> Outcome {
    let mut fx = Fixture::new()?;
    store.set_identity(&fx.me).await.or_fail("set_identity")?;
    let (a0, a1, a2) = (fx.address(0), fx.address(1), fx.address(2));
    store
        .set_prekeys(&fx.prekeys)
        .await
        .or_fail("set_prekeys")?;
    let p1 = PeerRecord {
        address: a1,
        trust: Trust::Unvalidated,
        first_seen: NOW - 100,
    };
    store.set_peer(&p1).await.or_fail("set_peer")?;
    let r0 = fx.record(0)?;
    let waiting = sent(0, a0, DeliveryState::Deposited, NOW - 50);
    store
        .commit_send(
            &r0,
            &entry(a0, eid(40), vec![1, 2, 3], NOW - 50),
            Some(&waiting),
        )
        .await
        .or_fail("commit_send")?;
    let r2 = fx.record(2)?;
    store.set_session(&a2, &r2).await.or_fail("set_session")?;

    let ids: Vec<EnvelopeId> = (0..8u8).map(eid).collect();
    let r0b = fx.two_sessions(0)?;
    let r1 = fx.record(1)?;
    let keys: Vec<[u8; 32]> = [&r0, &r0b, &r1, &r2]
        .iter()
        .flat_map(|r| r.ratchet_keys())
        .collect();

    // 1. commit_send: a record, an outbox entry, a new sent message.
    let new = sent(1, a1, DeliveryState::Stored, NOW);
    let e1 = entry(a1, eid(41), vec![4, 5], NOW);
    attempts(
        store,
        &mut inject,
        &ids,
        &keys,
        "commit_send",
        async |s: &mut S| s.commit_send(&r1, &e1, Some(&new)).await,
    )
    .await?;

    // 2. commit_receive: marks, two records, prekeys, a peer, inbox
    // messages, a receipt (delivered) and a new sent message.
    let mut prekeys = fx.prekeys.clone();
    prekeys.upload_counter += 1;
    prekeys.accepted.push((1, [0xc0; 16]));
    let p0 = PeerRecord {
        address: a0,
        trust: Trust::Unvalidated,
        first_seen: NOW,
    };
    let m0 = message(eid(0), a0, b"first", NOW);
    let m1 = message(eid(1), a1, b"second", NOW + 1);
    let delivered = SentMessage {
        body: Vec::new(),
        state: DeliveryState::Delivered,
        ..waiting.clone()
    };
    let r1b = fx.record(1)?;
    let (k0, k1) = (access(5, 0xd0), access(6, 0xd1));
    let batch = [
        ReceiveCommit {
            session: Some((&a0, &r0b)),
            prekeys: Some(&prekeys),
            peer: Some(&p0),
            message: Some(&m0),
            sent: Some(&delivered),
            access: Some((&a0, &k0)),
            ..mark(eid(0), NOW)
        },
        ReceiveCommit {
            session: Some((&a1, &r1b)),
            message: Some(&m1),
            access: Some((&a1, &k1)),
            ..mark(eid(1), NOW)
        },
        mark(eid(2), NOW),
    ];
    attempts(
        store,
        &mut inject,
        &ids,
        &keys,
        "commit_receive",
        async |s: &mut S| s.commit_receive(&batch).await,
    )
    .await?;

    // 3. quarantine_session.
    attempts(
        store,
        &mut inject,
        &ids,
        &keys,
        "quarantine_session",
        async |s: &mut S| s.quarantine_session(&a2, NOW, "test").await,
    )
    .await?;

    // 4. commit_send_many: three copies of one message (records, outbox
    // entries, sent messages).
    let copies = [
        (
            fx.record(0)?,
            entry(a0, eid(42), vec![6], NOW),
            Some(sent(3, a0, DeliveryState::Stored, NOW)),
        ),
        (
            fx.record(1)?,
            entry(a1, eid(43), vec![7], NOW),
            Some(sent(4, a1, DeliveryState::Stored, NOW)),
        ),
        (
            fx.record(2)?,
            entry(a2, eid(44), vec![8], NOW),
            Some(sent(5, a2, DeliveryState::Stored, NOW)),
        ),
    ];
    attempts(
        store,
        &mut inject,
        &ids,
        &keys,
        "commit_send_many",
        async |s: &mut S| s.commit_send_many(&copies).await,
    )
    .await
}

/// Runs `commit` with a fault at every write in turn until it succeeds:
/// each failure must leave the snapshot as it was; the success must change
/// it (and a second snapshot must agree with the first after success).
async fn attempts<S: Store>(
    store: &mut S,
    inject: &mut impl FnMut(&mut S, Option<u32>),
    ids: &[EnvelopeId],
    keys: &[[u8; 32]],
    what: &str,
    mut commit: impl AsyncFnMut(&mut S) -> Result<(), StoreError>,
) -> Outcome {
    let before = snapshot(store, ids, keys).await?;
    for n in 0..=MAX_INJECTED_WRITE {
        inject(store, Some(n));
        let result = commit(store).await;
        inject(store, None);
        let now = snapshot(store, ids, keys).await?;
        match result {
            Err(_) => ensure!(
                now == before,
                "{what} failed at injected write {n} but changed the store: {}",
                compact(&format!("{:?}", diff(&before, &now)))
            ),
            Ok(()) => {
                ensure!(
                    now != before,
                    "{what} succeeded (faults from write {n} on) but changed nothing"
                );
                return Ok(());
            }
        }
    }
    Err(format!(
        "{what} still failed with a fault at write {MAX_INJECTED_WRITE}: it never completes"
    ))
}

/// The fields of two snapshots that differ, by name.
fn diff(a: &Snapshot, b: &Snapshot) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut field = |name, same: bool| {
        if !same {
            out.push(name);
        }
    };
    field("prekeys", a.prekeys == b.prekeys);
    field("sessions", a.sessions == b.sessions);
    field("quarantined", a.quarantined == b.quarantined);
    field("peers", a.peers == b.peers);
    field("outbox", a.outbox == b.outbox);
    field("sent_messages", a.sent == b.sent);
    field("inbox", a.inbox == b.inbox);
    field("processed", a.processed == b.processed);
    field("routes", a.routes == b.routes);
    field("awaiting", a.awaiting == b.awaiting);
    field("access", a.access == b.access);
    out
}
