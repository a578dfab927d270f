//! A conformance suite for [`RelayStorage`] implementations: for relays
//! that keep their state in a backend of their own, a way to check it keeps
//! the contract of the trait (see [`RelayStorage`] and its methods) the way
//! [`MemoryRelayStorage`](super::MemoryRelayStorage), the reference, the
//! SQLite storage and the relay crate's PostgreSQL storage do.
//!
//! [`run`] runs every check in [`CHECKS`], each on a fresh storage from the
//! closure it is given, and panics with a message naming each check that
//! failed and why ("relay storage conformance: claim: ..."); [`try_run`]
//! returns the [`Violation`]s instead. Each check is also a function of its
//! own (`check_*`), for running one at a time.
//!
//! ```
//! use cubbyhole::relay::MemoryRelayStorage;
//!
//! cubbyhole::relay::conformance::run(MemoryRelayStorage::new);
//! ```
//!
//! In a test of your own storage:
//!
//! ```
//! # use cubbyhole::relay::MemoryRelayStorage as MyStorage;
//! use cubbyhole::relay::conformance;
//!
//! // Everything:
//! if let Err(violations) = conformance::try_run(MyStorage::new) {
//!     for v in &violations {
//!         eprintln!("{v}");
//!     }
//!     panic!("{} checks failed", violations.len());
//! }
//! // One check, on a storage made here:
//! conformance::check_claim(&mut MyStorage::new()).unwrap();
//! ```
//!
//! # What is checked
//!
//! Every check starts from an empty storage (the `empty` check verifies
//! that the closure makes one) and drives it through the trait only. The
//! checks, by name (see each `check_*` function):
//!
//! | name | contract |
//! |---|---|
//! | `empty` | a new storage holds nothing (no relay key, no mailbox owner either); reading, claiming, acknowledging, expiring (envelopes, inactive mailboxes, devices) and purging nothing succeeds |
//! | `upload` | [`RelayStorage::apply_upload`] writes the record; adding to and replacing the pool; [`RelayStorage::mailbox_exists`] |
//! | `upload_counter` | a counter not above the stored one is [`UploadOutcome::Replayed`] and writes nothing; counters compare as `u64` |
//! | `prekey_bound` | a pool over the bound is [`UploadOutcome::TooManyOneTimePrekeys`] and writes nothing (not even the counter) |
//! | `claim` | [`RelayStorage::claim_one_time_prekey`] hands out the oldest key, each once, and the count goes down |
//! | `insert` | [`RelayStorage::insert_envelope`] stores once per id and mailbox (the first payload stays) |
//! | `insert_bounds` | [`MailboxLimits`]: [`InsertOutcome::TooManyEnvelopes`], [`InsertOutcome::TooManyBytes`], nothing written; a duplicate stays [`InsertOutcome::Duplicate`] |
//! | `insert_batch` | [`RelayStorage::insert_envelopes`]: each envelope as by `insert_envelope`, in order, earlier ones of the batch counted |
//! | `list` | [`RelayStorage::list_envelopes`]: oldest first, `limit`, `max_bytes` (the first always), `received_since` |
//! | `acknowledge` | [`RelayStorage::acknowledge_envelopes`] deletes only the named pending ids of that mailbox, remembers them, counts them |
//! | `usage` | [`RelayStorage::mailbox_usage`] exact after inserts, refusals, acknowledgments and expiry |
//! | `expiry` | [`RelayStorage::expire_envelopes`] and `insert_envelope`'s `expire_before`: strictly before, acknowledged ids too |
//! | `claim_budget` | [`RelayStorage::claim_one_time_prekey`] with a [`ClaimBudget`]: a burst then a rate, [`ClaimOutcome::Limited`] writes nothing, the claim time survives uploads, per device, an empty pool spends nothing |
//! | `challenges` | [`RelayStorage::consume_challenge`]: single use, per mailbox, records kept up to their expiry (inclusive), [`RelayStorage::purge_challenges`] |
//! | `relay_key` | [`RelayStorage::relay_key`]: the first key stored stays, `None` only reads |
//! | `groups` | [`RelayStorage::begin_group`] / [`RelayStorage::commit_group`]: reads inside see the group's writes, a refused call writes nothing, everything is there after the commit |
//! | `large_values` | counters and signed-prekey creation times over their whole `u64` range; an expiry of `u64::MAX` |
//! | `device_lists` | [`RelayStorage::append_device_list`] stores only the next version over the head it names: a second version 1, a version over another head, a gap and a second list of a stored version are [`AppendOutcome::HeadMoved`] and write nothing; accounts are separate |
//! | `device_list_retention` | the newest `retain` versions are kept; [`RelayStorage::device_lists_after`] is oldest first, above `after`, at most `limit` |
//! | `shares` | [`Share`]s: each bounded on its own by its [`MailboxLimits`] (a full strangers' share does not stop contacts' deposits, nor the reverse), in a batch too; duplicates span both shares; [`MailboxUsage`] counts per share, and acknowledgments and expiry keep the counts right (a share refills) |
//! | `access` | [`RelayStorage::apply_upload`] stores, rotates and keeps the access verifiers as documented (a refused upload changes nothing); [`RelayStorage::mailbox_owner`] is the record of the mailbox's device, `None` for another mailbox |
//! | `owner_seen` | `owner_seen_at` is the last accepted upload's `published_at` or the time of the last successful [`RelayStorage::consume_challenge`] (never moved back); a refused use or upload leaves it |
//! | `inactive` | [`RelayStorage::expire_inactive`] deletes the envelopes and acknowledged ids received before the cutoff of the mailboxes whose owner was seen before the other cutoff (both strict), only those, counts them, keeps usage right |
//! | `expire_devices` | [`RelayStorage::expire_devices`] deletes each device not seen since the cutoff (strict) with its pool, claim time, mailbox content and used challenges, and counts them; a re-publish starts afresh; other devices keep everything |
//!
//! An error returned by the storage fails the check that met it, naming
//! the method and the error. A storage that panics is not caught.
//!
//! # What is not checked: failures and concurrency
//!
//! "Nothing was written" is checked wherever the trait promises it for an
//! outcome (a replayed upload, a pool over the bound, a full mailbox). A
//! *failure* halfway (a write error, the process dying, a lost connection)
//! cannot be provoked through the trait, so the promise that a call (or an
//! [`RelayStorage::insert_envelopes`] batch, or a group whose commit
//! failed) that returned an error wrote nothing is the implementor's to
//! test with fault injection of its own; so are durability and several
//! relay processes sharing one database (the crate's SQLite tests and the
//! relay crate's `relay/tests/crash.rs` and `relay/tests/postgres.rs` do
//! this and may serve as examples).
//!
//! # Test data
//!
//! Identity keys and signed prekeys are real (derived from fixed seeds, so
//! failures reproduce); one-time prekeys and payloads are made-up bytes,
//! which a storage stores without interpreting.

use std::fmt;
use std::format;
use std::string::String;
use std::vec;
use std::vec::Vec;

use super::{
    AppendOutcome, ClaimBudget, ClaimOutcome, DeviceRecord, InsertOutcome, MailboxLimits,
    MailboxUsage, RelayKey, RelayStorage, RelayStorageError, Share, StoredDeviceList,
    UploadOutcome,
};
use crate::protocol::devices::AccountId;
use crate::protocol::keys::{IdentityKeyPair, SignedPrekey};
use crate::transport::{
    AccessVerifier, BundleSetUpload, DeviceAddress, Envelope, EnvelopeId, MailboxId,
    SignedPrekeyRecord,
};

/// A broken promise: which check found it and what was wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The check's name (as in [`CHECKS`]).
    pub check: &'static str,
    /// What the storage did wrong (or the error it returned).
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "relay storage conformance: {}: {}",
            self.check, self.message
        )
    }
}

impl std::error::Error for Violation {}

/// One check of the suite.
#[derive(Clone, Copy)]
pub struct Check {
    /// Its name (the `check_*` function's, without the prefix).
    pub name: &'static str,
    /// Runs it on a storage, which must be empty (fresh).
    pub run: fn(&mut dyn RelayStorage) -> Result<(), Violation>,
}

impl fmt::Debug for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Check")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Runs every check of [`CHECKS`], each on a fresh storage from `make`;
/// returns the violations found (every check runs, whatever the others
/// found).
///
/// # Errors
/// The violations, in the order of [`CHECKS`], if any check failed.
pub fn try_run<S: RelayStorage>(mut make: impl FnMut() -> S) -> Result<(), Vec<Violation>> {
    let violations: Vec<Violation> = CHECKS
        .iter()
        .filter_map(|check| {
            let mut storage = make();
            (check.run)(&mut storage).err()
        })
        .collect();
    if violations.is_empty() {
        Ok(())
    } else {
        Err(violations)
    }
}

/// Runs every check of [`CHECKS`], each on a fresh storage from `make`.
///
/// # Panics
/// If any check fails, with a message naming each failed check and what
/// was wrong ("relay storage conformance: claim: ...").
pub fn run<S: RelayStorage>(make: impl FnMut() -> S) {
    if let Err(violations) = try_run(make) {
        match violations.as_slice() {
            [one] => panic!("{one}"),
            all => {
                let lines: Vec<String> = all.iter().map(|v| format!("  {v}")).collect();
                panic!(
                    "relay storage conformance: {} of {} checks failed:\n{}",
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
            /// The storage must be empty (fresh).
            ///
            /// # Errors
            /// A [`Violation`] naming the check and what was wrong.
            pub fn $public(storage: &mut dyn RelayStorage) -> Result<(), Violation> {
                $body(storage).map_err(|message| Violation { check: $name, message })
            }
        )+

        /// Every check, in the order [`run`] runs them.
        pub const CHECKS: &[Check] = &[$( Check { name: $name, run: $public } ),+];
    };
}

checks! {
    /// `empty`: a new storage has no device record, no mailbox, no
    /// one-time prekeys, envelopes, used challenges or relay key
    /// (`relay_key(None)` is `None`); claiming, acknowledging, expiring and
    /// purging what is not there succeeds and finds nothing.
    check_empty => "empty", empty;
    /// `upload`: [`RelayStorage::apply_upload`] returns
    /// [`UploadOutcome::Applied`] and [`RelayStorage::device`] returns the
    /// record (device, counter, signed prekey, `published_at`);
    /// [`RelayStorage::mailbox_exists`] is true for the device's mailbox
    /// only; an upload that adds keeps the pool's order, appends new ids
    /// and gives an id already pooled its new key in its place; an upload
    /// that replaces drops the old pool.
    check_upload => "upload", upload;
    /// `upload_counter`: an upload whose counter equals or is below the
    /// stored one is [`UploadOutcome::Replayed`] and changes nothing
    /// (record, pool); a higher counter applies; counters compare as `u64`
    /// (2^63 and above are higher than 2^63 - 1).
    check_upload_counter => "upload_counter", upload_counter;
    /// `prekey_bound`: a pool of exactly `max_one_time_prekeys` applies; an
    /// upload that would leave more (counting ids already pooled once) is
    /// [`UploadOutcome::TooManyOneTimePrekeys`] and writes nothing: the
    /// record, the pool and the counter stay (the same counter applies
    /// afterwards).
    check_prekey_bound => "prekey_bound", prekey_bound;
    /// `claim`: [`RelayStorage::claim_one_time_prekey`] returns the pool's
    /// oldest key and removes it: every key once, in pool order, then
    /// `None`; [`RelayStorage::one_time_prekey_count`] goes down by one per
    /// claim; another device's pool is untouched.
    check_claim => "claim", claim;
    /// `insert`: [`RelayStorage::insert_envelope`] stores an envelope
    /// ([`InsertOutcome::Stored`]); the same id again is
    /// [`InsertOutcome::Duplicate`] and the first payload stays; the same id
    /// in another mailbox is another envelope.
    check_insert => "insert", insert;
    /// `insert_bounds`: a mailbox holding `max_envelopes` refuses one more
    /// ([`InsertOutcome::TooManyEnvelopes`]); an envelope that would take it
    /// over `max_bytes` is [`InsertOutcome::TooManyBytes`] (one that fits
    /// exactly is stored); refusals write nothing; a pending id stays
    /// [`InsertOutcome::Duplicate`] even in a full mailbox.
    check_insert_bounds => "insert_bounds", insert_bounds;
    /// `insert_batch`: [`RelayStorage::insert_envelopes`] answers each
    /// envelope as [`RelayStorage::insert_envelope`] would in the batch's
    /// order (an id repeated in the batch is a duplicate, earlier envelopes
    /// count against the bounds), per mailbox, and stores the ones it says.
    check_insert_batch => "insert_batch", insert_batch;
    /// `list`: [`RelayStorage::list_envelopes`] returns the mailbox's
    /// envelopes whole, oldest first (in insertion order, whatever the
    /// ids), at most `limit`, stopping before the envelope that would take
    /// the total over `max_bytes` but always including the first, and only
    /// those received at or after `received_since`; listing deletes
    /// nothing.
    check_list => "list", list;
    /// `acknowledge`: [`RelayStorage::acknowledge_envelopes`] deletes
    /// exactly the named pending envelopes of that mailbox and returns how
    /// many; unknown ids, ids of another mailbox and ids already
    /// acknowledged are ignored (not counted); an acknowledged id is
    /// remembered: inserting it again is [`InsertOutcome::Duplicate`].
    check_acknowledge => "acknowledge", acknowledge;
    /// `usage`: [`RelayStorage::mailbox_usage`] counts the mailbox's
    /// pending envelopes and payload bytes exactly, after inserts,
    /// duplicates, refusals, acknowledgments and expiry, and counts expired
    /// envelopes not yet deleted.
    check_usage => "usage", usage_check;
    /// `expiry`: [`RelayStorage::expire_envelopes`] deletes the envelopes
    /// (of every mailbox) received before `received_before`, keeps those
    /// received at it or later, returns how many pending envelopes it
    /// deleted, and forgets acknowledged ids received before it (they can
    /// be inserted again); [`RelayStorage::insert_envelope`] first expires
    /// the mailbox by `expire_before` (freeing room under the bounds).
    check_expiry => "expiry", expiry;
    /// `claim_budget`: [`RelayStorage::claim_one_time_prekey`] with a
    /// [`ClaimBudget`] of a burst of 3 and one claim a second claims 3 keys
    /// at once (oldest first), then is [`ClaimOutcome::Limited`] (the pool
    /// keeps its keys) until a second has passed, then claims one; an
    /// upload does not reset the claim time; another device's budget is its
    /// own; claims of an empty pool ([`ClaimOutcome::Empty`]) spend
    /// nothing; without a budget a claim is not limited.
    check_claim_budget => "claim_budget", claim_budget;
    /// `challenges`: [`RelayStorage::consume_challenge`] is true at a
    /// challenge's first use and false after (per mailbox: the same bytes
    /// in another mailbox are another challenge); a record is kept while
    /// `now <= expires_at` and deleted by the mailbox's next use after
    /// that; [`RelayStorage::purge_challenges`] deletes and counts the
    /// records with `expires_at < now` of every mailbox and keeps the
    /// others.
    check_challenges => "challenges", challenges;
    /// `relay_key`: [`RelayStorage::relay_key`] with a key stores it in a
    /// storage without one and returns it; afterwards it returns that key
    /// whatever key it is offered, and with `None` too.
    check_relay_key => "relay_key", relay_key;
    /// `groups`: between [`RelayStorage::begin_group`] and
    /// [`RelayStorage::commit_group`] reads see the group's writes, a call
    /// refused by an outcome writes nothing while the others' writes stay,
    /// and after the commit everything is there; groups follow one another.
    check_groups => "groups", groups;
    /// `large_values`: upload counters and signed-prekey creation times
    /// round trip over the whole `u64` range (bit for bit) and counters
    /// compare as `u64`; a used challenge expiring at `u64::MAX` is
    /// remembered.
    check_large_values => "large_values", large_values;
    /// `device_lists`: a new storage has no device list; version 1 of an
    /// account appends ([`AppendOutcome::Appended`]) and is the head; a
    /// second version 1, a version 2 naming another previous hash, a
    /// version 3 over head 1 (a gap), and, once version 2 is stored, a
    /// second version 2 naming the right previous hash, are each
    /// [`AppendOutcome::HeadMoved`] and change nothing (the chain cannot
    /// fork); each stored version reads back byte for byte; another
    /// account's chain is separate.
    check_device_lists => "device_lists", device_lists;
    /// `device_list_retention`: appending versions 1 to 6 with `retain` 3
    /// keeps versions 4 to 6 only; [`RelayStorage::device_lists_after`]
    /// returns the versions above `after`, oldest first, at most `limit`
    /// (the oldest of them), nothing above the head.
    check_device_list_retention => "device_list_retention", device_list_retention;
    /// `shares`: [`RelayStorage::insert_envelope`] bounds each [`Share`] of
    /// a mailbox by its own [`MailboxLimits`] fields, counting only that
    /// share's pending envelopes: a full strangers' share refuses
    /// ([`InsertOutcome::TooManyEnvelopes`], [`InsertOutcome::TooManyBytes`])
    /// while the contacts' share still takes deposits, and the reverse; an
    /// id pending or acknowledged in one share is a duplicate in the other
    /// (even with room); [`RelayStorage::insert_envelopes`] counts the
    /// batch's earlier envelopes per share; [`MailboxUsage`] counts both
    /// shares in `envelopes`/`bytes` and the strangers' in
    /// `stranger_envelopes`/`stranger_bytes`, exactly, after
    /// acknowledgments and expiry (by `expire_envelopes` and by
    /// `expire_before`), so that a share refills; listing returns both
    /// shares in deposit order.
    check_shares => "shares", shares;
    /// `access`: [`RelayStorage::apply_upload`] of a device's first upload
    /// stores its access verifier (or none) with `access_changed_at` =
    /// `published_at` (0 without one); an upload with another verifier
    /// moves the current one to `previous_access` and stamps the time; one
    /// without a verifier, or with the current one, keeps all three; a
    /// replayed upload or one over the prekey bound changes nothing;
    /// [`RelayStorage::mailbox_owner`] returns the same record as
    /// [`RelayStorage::device`] for the device's mailbox, `None` for a
    /// mailbox without a device.
    check_access => "access", access;
    /// `owner_seen`: `owner_seen_at` is set to `published_at` by an applied
    /// upload and raised to `now` by a successful
    /// [`RelayStorage::consume_challenge`] of the device's mailbox (never
    /// lowered by an earlier `now`); a use of a challenge already used, a
    /// replayed upload and another mailbox's challenge leave it; a
    /// challenge of a mailbox without a device creates no record.
    check_owner_seen => "owner_seen", owner_seen;
    /// `inactive`: [`RelayStorage::expire_inactive`] deletes the envelopes
    /// (of both shares) and acknowledged ids received before
    /// `received_before` of each mailbox whose owner has `owner_seen_at <
    /// seen_before`, keeps those of other mailboxes (seen at the cutoff or
    /// later, or without a device) and those received at the cutoff or
    /// later, returns how many pending envelopes it deleted, keeps the
    /// device and its pool, and leaves the usage right.
    check_inactive => "inactive", inactive;
    /// `expire_devices`: [`RelayStorage::expire_devices`] deletes each
    /// device with `owner_seen_at < seen_before` (not one seen at the
    /// cutoff): its record ([`RelayStorage::device`],
    /// [`RelayStorage::mailbox_owner`], [`RelayStorage::mailbox_exists`]),
    /// one-time prekeys, claim time, and its mailbox's envelopes,
    /// acknowledged ids and used challenges; it returns how many devices; a
    /// new upload of the device starts afresh (any counter, no verifier,
    /// the new pool only, a full claim budget, an empty mailbox); other
    /// devices keep everything.
    check_expire_devices => "expire_devices", expire_devices_check;
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

/// Turns a storage error into the check's failure, naming the method.
trait OrFail<T> {
    fn or_fail(self, method: &str) -> Result<T, String>;
}

impl<T> OrFail<T> for Result<T, RelayStorageError> {
    fn or_fail(self, method: &str) -> Result<T, String> {
        self.map_err(|e| format!("RelayStorage::{method} returned an error: {e} ({e:?})"))
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

/// A device of the test data: a real identity key and signed prekey.
struct Device {
    keys: IdentityKeyPair,
    address: DeviceAddress,
    signed_prekey: SignedPrekeyRecord,
}

impl Device {
    /// Device `n` (a different identity key for each `n`).
    fn new(n: u8) -> Device {
        let keys = IdentityKeyPair::from_seed(&[n; 32]);
        let address = DeviceAddress::new(keys.public(), u32::from(n));
        let spk =
            SignedPrekey::from_secret(&keys, 1, NOW - 60, [n ^ 0x5a; 32]).expect("a time in range");
        Device {
            address,
            signed_prekey: SignedPrekeyRecord::of(&spk),
            keys,
        }
    }

    fn mailbox(&self) -> MailboxId {
        self.address.mailbox()
    }

    /// An upload with one-time prekeys `ids` (keys made from the ids and
    /// `salt`).
    fn upload(&self, counter: u64, ids: &[u32], salt: u8, replace: bool) -> BundleSetUpload {
        BundleSetUpload {
            device: self.address,
            counter,
            signed_prekey: self.signed_prekey,
            replace_one_time_prekeys: replace,
            one_time_prekeys: ids.iter().map(|&id| (id, opk(id, salt))).collect(),
            access_verifier: None,
            identity_stamp: None,
        }
    }

    /// Another signed prekey (id 2) for this device.
    fn rotated(&self) -> SignedPrekeyRecord {
        let spk =
            SignedPrekey::from_secret(&self.keys, 2, NOW, [0xa5; 32]).expect("a time in range");
        SignedPrekeyRecord::of(&spk)
    }
}

/// The made-up key of one-time prekey `id` in uploads with `salt`.
fn opk(id: u32, salt: u8) -> [u8; 32] {
    let mut key = [salt; 32];
    key[..4].copy_from_slice(&id.to_be_bytes());
    key
}

fn eid(k: u8) -> EnvelopeId {
    EnvelopeId([k; 16])
}

/// Envelope `k` with a payload of `len` bytes of `fill`.
fn env(k: u8, len: usize, fill: u8) -> Envelope {
    Envelope {
        id: eid(k),
        payload: vec![fill; len],
    }
}

fn ids(envelopes: &[Envelope]) -> Vec<u8> {
    envelopes.iter().map(|e| e.id.0[0]).collect()
}

/// Bounds that allow everything, expiring nothing.
const OPEN: MailboxLimits = MailboxLimits {
    max_envelopes: u32::MAX,
    max_bytes: u64::MAX,
    max_stranger_envelopes: u32::MAX,
    max_stranger_bytes: u64::MAX,
    expire_before: 0,
};

fn apply(s: &mut dyn RelayStorage, upload: &BundleSetUpload, at: u64, max: u32) -> Outcome {
    let outcome = s.apply_upload(upload, at, max).or_fail("apply_upload")?;
    same(
        &format!("apply_upload (counter {})", upload.counter),
        &outcome,
        &UploadOutcome::Applied,
    )
}

fn insert_stored(s: &mut dyn RelayStorage, m: &MailboxId, e: &Envelope, at: u64) -> Outcome {
    let outcome = s
        .insert_envelope(m, e, Share::Contacts, at, OPEN)
        .or_fail("insert_envelope")?;
    same(
        &format!("insert_envelope of a new id {:?}", e.id),
        &outcome,
        &InsertOutcome::Stored,
    )
}

fn list_all(s: &dyn RelayStorage, m: &MailboxId) -> Result<Vec<Envelope>, String> {
    s.list_envelopes(m, 0, u32::MAX, u64::MAX)
        .or_fail("list_envelopes")
}

fn usage(s: &dyn RelayStorage, m: &MailboxId) -> Result<MailboxUsage, String> {
    s.mailbox_usage(m).or_fail("mailbox_usage")
}

fn usage_is(
    s: &dyn RelayStorage,
    m: &MailboxId,
    when: &str,
    envelopes: u64,
    bytes: u64,
) -> Outcome {
    same(
        &format!("mailbox_usage {when}"),
        &usage(s, m)?,
        &MailboxUsage {
            envelopes,
            bytes,
            ..MailboxUsage::default()
        },
    )
}

/// Claims a key without a budget: `None` for [`ClaimOutcome::Empty`].
fn claim_one(
    s: &mut dyn RelayStorage,
    d: &DeviceAddress,
) -> Result<Option<(u32, [u8; 32])>, String> {
    match s
        .claim_one_time_prekey(d, None)
        .or_fail("claim_one_time_prekey")?
    {
        ClaimOutcome::Claimed(id, key) => Ok(Some((id, key))),
        ClaimOutcome::Empty => Ok(None),
        ClaimOutcome::Limited => {
            Err("claim_one_time_prekey() without a budget is ClaimOutcome::Limited".into())
        }
    }
}

/// Claims every key left, in order.
fn claim_all(s: &mut dyn RelayStorage, d: &DeviceAddress) -> Result<Vec<u32>, String> {
    let mut out = Vec::new();
    while let Some((id, _)) = claim_one(s, d)? {
        out.push(id);
        ensure!(
            out.len() <= 1_000,
            "claim_one_time_prekey keeps returning keys (1 000 claimed from a small pool)"
        );
    }
    Ok(out)
}

fn count(s: &dyn RelayStorage, d: &DeviceAddress) -> Result<u32, String> {
    s.one_time_prekey_count(d).or_fail("one_time_prekey_count")
}

fn record(s: &dyn RelayStorage, d: &Device) -> Result<Option<DeviceRecord>, String> {
    s.device(&d.address).or_fail("device")
}

/// Uses challenge `[c; 32]` of mailbox `m` at `now`, expiring at
/// `expires_at`: whether it was the first use.
fn consume(
    s: &mut dyn RelayStorage,
    m: &MailboxId,
    c: u8,
    now: u64,
    expires_at: u64,
) -> Result<bool, String> {
    s.consume_challenge(m, &[c; 32], now, expires_at)
        .or_fail("consume_challenge")
}

/// A claim with `budget`.
fn claim_with(
    s: &mut dyn RelayStorage,
    d: &DeviceAddress,
    budget: ClaimBudget,
) -> Result<ClaimOutcome, String> {
    s.claim_one_time_prekey(d, Some(budget))
        .or_fail("claim_one_time_prekey")
}

// ---------------------------------------------------------------------------
// The checks.

fn empty(s: &mut dyn RelayStorage) -> Outcome {
    let a = Device::new(1);
    same("device() of a new storage", &record(s, &a)?, &None)?;
    same(
        "mailbox_owner() of a new storage",
        &s.mailbox_owner(&a.mailbox()).or_fail("mailbox_owner")?,
        &None,
    )?;
    same(
        "expire_inactive() of a new storage",
        &s.expire_inactive(u64::MAX, u64::MAX)
            .or_fail("expire_inactive")?,
        &0,
    )?;
    same(
        "expire_devices() of a new storage",
        &s.expire_devices(u64::MAX).or_fail("expire_devices")?,
        &0,
    )?;
    ensure!(
        !s.mailbox_exists(&a.mailbox()).or_fail("mailbox_exists")?,
        "mailbox_exists() is true in a new storage"
    );
    same("one_time_prekey_count()", &count(s, &a.address)?, &0)?;
    same("claim_one_time_prekey()", &claim_one(s, &a.address)?, &None)?;
    same("list_envelopes()", &list_all(s, &a.mailbox())?, &Vec::new())?;
    usage_is(s, &a.mailbox(), "of a new storage", 0, 0)?;
    same(
        "acknowledge_envelopes() of unknown ids",
        &s.acknowledge_envelopes(&a.mailbox(), &[eid(1)])
            .or_fail("acknowledge_envelopes")?,
        &0,
    )?;
    same(
        "expire_envelopes()",
        &s.expire_envelopes(u64::MAX).or_fail("expire_envelopes")?,
        &0,
    )?;
    same(
        "purge_challenges()",
        &s.purge_challenges(u64::MAX).or_fail("purge_challenges")?,
        &0,
    )?;
    ensure!(
        s.relay_key(None).or_fail("relay_key")?.is_none(),
        "relay_key(None) of a new storage returned a key"
    );
    Ok(())
}

fn upload(s: &mut dyn RelayStorage) -> Outcome {
    let (a, b) = (Device::new(1), Device::new(2));
    apply(s, &a.upload(5, &[10, 11, 12], 1, false), NOW, 100)?;
    same(
        "device() after an upload",
        &record(s, &a)?,
        &Some(DeviceRecord {
            device: a.address,
            counter: 5,
            signed_prekey: a.signed_prekey,
            published_at: NOW,
            access: None,
            previous_access: None,
            access_changed_at: 0,
            owner_seen_at: NOW,
        }),
    )?;
    ensure!(
        s.mailbox_exists(&a.mailbox()).or_fail("mailbox_exists")?,
        "mailbox_exists() is false for the mailbox of a device with a record"
    );
    ensure!(
        !s.mailbox_exists(&b.mailbox()).or_fail("mailbox_exists")?,
        "mailbox_exists() is true for the mailbox of a device without a record"
    );
    same("device() of another device", &record(s, &b)?, &None)?;
    same("one_time_prekey_count()", &count(s, &a.address)?, &3)?;

    // Adding: 11 takes a new key in its place, 13 goes to the back.
    let mut add = a.upload(6, &[13, 11], 2, false);
    add.signed_prekey = a.rotated();
    apply(s, &add, NOW + 1, 100)?;
    same(
        "device() after a second upload",
        &record(s, &a)?,
        &Some(DeviceRecord {
            device: a.address,
            counter: 6,
            signed_prekey: a.rotated(),
            published_at: NOW + 1,
            access: None,
            previous_access: None,
            access_changed_at: 0,
            owner_seen_at: NOW + 1,
        }),
    )?;
    same(
        "one_time_prekey_count() after adding 13 and re-uploading 11",
        &count(s, &a.address)?,
        &4,
    )?;
    let mut claimed = Vec::new();
    while let Some(key) = claim_one(s, &a.address)? {
        claimed.push(key);
        ensure!(claimed.len() <= 10, "claim_one_time_prekey never runs out");
    }
    same(
        "the pool after adding (claimed in order; 11 keeps its place with its new key)",
        &claimed,
        &vec![
            (10, opk(10, 1)),
            (11, opk(11, 2)),
            (12, opk(12, 1)),
            (13, opk(13, 2)),
        ],
    )?;

    // Replacing.
    apply(s, &a.upload(7, &[20, 21], 1, false), NOW + 2, 100)?;
    apply(s, &a.upload(8, &[30, 31], 3, true), NOW + 3, 100)?;
    same(
        "the pool after an upload that replaces it",
        &claim_all(s, &a.address)?,
        &vec![30, 31],
    )?;
    apply(s, &a.upload(9, &[], 3, true), NOW + 4, 100)?;
    same(
        "one_time_prekey_count() after replacing with nothing",
        &count(s, &a.address)?,
        &0,
    )?;
    same(
        "the counter after four more uploads",
        &record(s, &a)?.map(|r| r.counter),
        &Some(9),
    )?;
    Ok(())
}

fn upload_counter(s: &mut dyn RelayStorage) -> Outcome {
    let a = Device::new(1);
    apply(s, &a.upload(10, &[1, 2], 1, false), NOW, 100)?;
    let before = record(s, &a)?;
    for counter in [10, 9, 0] {
        let mut replay = a.upload(counter, &[3], 1, true);
        replay.signed_prekey = a.rotated();
        same(
            &format!("apply_upload with counter {counter} after 10"),
            &s.apply_upload(&replay, NOW + 5, 100)
                .or_fail("apply_upload")?,
            &UploadOutcome::Replayed,
        )?;
    }
    same("device() after refused replays", &record(s, &a)?, &before)?;
    same(
        "one_time_prekey_count() after refused replays",
        &count(s, &a.address)?,
        &2,
    )?;
    apply(s, &a.upload(11, &[3], 1, false), NOW + 6, 100)?;
    same(
        "one_time_prekey_count() after 11",
        &count(s, &a.address)?,
        &3,
    )?;
    // Unsigned: 2^63 is above 2^63 - 1, and 2^63 - 1 is then a replay.
    let high = 1u64 << 63;
    apply(s, &a.upload(high - 1, &[], 1, false), NOW + 7, 100)?;
    apply(s, &a.upload(high, &[], 1, false), NOW + 8, 100)?;
    same(
        "apply_upload with counter 2^63 - 1 after 2^63",
        &s.apply_upload(&a.upload(high - 1, &[], 1, false), NOW + 9, 100)
            .or_fail("apply_upload")?,
        &UploadOutcome::Replayed,
    )?;
    same(
        "the counter after 2^63",
        &record(s, &a)?.map(|r| r.counter),
        &Some(high),
    )?;
    Ok(())
}

fn prekey_bound(s: &mut dyn RelayStorage) -> Outcome {
    let a = Device::new(1);
    apply(s, &a.upload(1, &[1, 2, 3], 1, false), NOW, 4)?;
    let before = record(s, &a)?;
    // 3 pooled + 2 new (one id already pooled) = 4: fits.
    apply(s, &a.upload(2, &[3, 4], 2, false), NOW + 1, 4)?;
    // One more is over.
    let mut over = a.upload(3, &[5], 2, false);
    over.signed_prekey = a.rotated();
    same(
        "apply_upload adding a fifth key with a bound of 4",
        &s.apply_upload(&over, NOW + 2, 4).or_fail("apply_upload")?,
        &UploadOutcome::TooManyOneTimePrekeys,
    )?;
    let replacing = a.upload(3, &[6, 7, 8, 9, 10], 2, true);
    same(
        "apply_upload replacing the pool with five keys with a bound of 4",
        &s.apply_upload(&replacing, NOW + 2, 4)
            .or_fail("apply_upload")?,
        &UploadOutcome::TooManyOneTimePrekeys,
    )?;
    let after = record(s, &a)?;
    ensure!(
        after.is_some_and(|r| r.counter == 2 && r.signed_prekey == a.signed_prekey),
        "a refused upload (TooManyOneTimePrekeys) changed the record: {after:?} (before: {before:?} then counter 2)"
    );
    same(
        "one_time_prekey_count() after refused uploads",
        &count(s, &a.address)?,
        &4,
    )?;
    // The refused counter was not taken.
    apply(s, &a.upload(3, &[], 2, true), NOW + 3, 4)?;
    same(
        "one_time_prekey_count() after replacing with nothing",
        &count(s, &a.address)?,
        &0,
    )?;
    Ok(())
}

fn claim(s: &mut dyn RelayStorage) -> Outcome {
    let (a, b) = (Device::new(1), Device::new(2));
    apply(s, &a.upload(1, &[30, 10, 20], 1, false), NOW, 100)?;
    apply(s, &b.upload(1, &[40], 1, false), NOW, 100)?;
    for (left, id) in [(2u32, 30u32), (1, 10), (0, 20)] {
        same(
            "claim_one_time_prekey() (the oldest first)",
            &claim_one(s, &a.address)?,
            &Some((id, opk(id, 1))),
        )?;
        same(
            &format!("one_time_prekey_count() after claiming {id}"),
            &count(s, &a.address)?,
            &left,
        )?;
    }
    for _ in 0..2 {
        same(
            "claim_one_time_prekey() of an exhausted pool",
            &claim_one(s, &a.address)?,
            &None,
        )?;
    }
    same(
        "one_time_prekey_count() of another device",
        &count(s, &b.address)?,
        &1,
    )?;
    same(
        "claim_one_time_prekey() of an unknown device",
        &claim_one(s, &Device::new(3).address)?,
        &None,
    )?;
    Ok(())
}

fn insert(s: &mut dyn RelayStorage) -> Outcome {
    let (a, b) = (Device::new(1).mailbox(), Device::new(2).mailbox());
    insert_stored(s, &a, &env(1, 10, 0xaa), NOW)?;
    same(
        "insert_envelope of an id already pending",
        &s.insert_envelope(&a, &env(1, 20, 0xbb), Share::Contacts, NOW + 1, OPEN)
            .or_fail("insert_envelope")?,
        &InsertOutcome::Duplicate,
    )?;
    same(
        "list_envelopes() after a duplicate",
        &list_all(s, &a)?,
        &vec![env(1, 10, 0xaa)],
    )?;
    insert_stored(s, &b, &env(1, 5, 0xcc), NOW)?;
    same(
        "list_envelopes() of a",
        &list_all(s, &a)?,
        &vec![env(1, 10, 0xaa)],
    )?;
    same(
        "list_envelopes() of b",
        &list_all(s, &b)?,
        &vec![env(1, 5, 0xcc)],
    )?;
    // An empty payload is an envelope too.
    insert_stored(s, &a, &env(2, 0, 0), NOW + 2)?;
    same(
        "list_envelopes() with an empty payload",
        &list_all(s, &a)?,
        &vec![env(1, 10, 0xaa), env(2, 0, 0)],
    )?;
    Ok(())
}

fn insert_bounds(s: &mut dyn RelayStorage) -> Outcome {
    let m = Device::new(1).mailbox();
    let limits = MailboxLimits {
        max_stranger_envelopes: u32::MAX,
        max_stranger_bytes: u64::MAX,
        max_envelopes: 3,
        max_bytes: 100,
        expire_before: 0,
    };
    let try_insert = |s: &mut dyn RelayStorage, e: &Envelope| {
        s.insert_envelope(&m, e, Share::Contacts, NOW, limits)
            .or_fail("insert_envelope")
    };
    same(
        "insert of 60 bytes",
        &try_insert(s, &env(1, 60, 1))?,
        &InsertOutcome::Stored,
    )?;
    same(
        "insert of 41 more bytes with max_bytes 100",
        &try_insert(s, &env(2, 41, 2))?,
        &InsertOutcome::TooManyBytes,
    )?;
    same(
        "insert of 40 more bytes with max_bytes 100 (exactly full)",
        &try_insert(s, &env(3, 40, 3))?,
        &InsertOutcome::Stored,
    )?;
    same(
        "insert of an empty payload into a mailbox at its byte bound",
        &try_insert(s, &env(4, 0, 4))?,
        &InsertOutcome::Stored,
    )?;
    same(
        "insert into a mailbox holding max_envelopes (3)",
        &try_insert(s, &env(5, 0, 5))?,
        &InsertOutcome::TooManyEnvelopes,
    )?;
    same(
        "insert of a pending id into a full mailbox",
        &try_insert(s, &env(1, 60, 1))?,
        &InsertOutcome::Duplicate,
    )?;
    same(
        "list_envelopes() after refusals",
        &ids(&list_all(s, &m)?),
        &vec![1, 3, 4],
    )?;
    usage_is(s, &m, "after refusals", 3, 100)?;
    // Refused ids were not remembered: with room, they are stored.
    same(
        "insert of an id refused earlier, with room",
        &s.insert_envelope(&m, &env(2, 41, 2), Share::Contacts, NOW, OPEN)
            .or_fail("insert_envelope")?,
        &InsertOutcome::Stored,
    )?;
    Ok(())
}

fn insert_batch(s: &mut dyn RelayStorage) -> Outcome {
    let (a, b) = (Device::new(1).mailbox(), Device::new(2).mailbox());
    insert_stored(s, &a, &env(1, 10, 1), NOW)?;
    let limits = MailboxLimits {
        max_stranger_envelopes: u32::MAX,
        max_stranger_bytes: u64::MAX,
        max_envelopes: 3,
        max_bytes: 1_000,
        expire_before: 0,
    };
    let batch = vec![
        (a, env(1, 10, 9), Share::Contacts),  // pending: duplicate
        (a, env(2, 10, 2), Share::Contacts),  // stored (2 pending)
        (b, env(2, 10, 2), Share::Contacts),  // another mailbox: stored
        (a, env(2, 10, 9), Share::Contacts),  // earlier in the batch: duplicate
        (a, env(3, 10, 3), Share::Contacts),  // stored (3 pending)
        (a, env(4, 10, 4), Share::Contacts),  // full
        (b, env(5, 995, 5), Share::Contacts), // over b's bytes (10 + 995)
        (b, env(6, 990, 6), Share::Contacts), // fits exactly
    ];
    let outcomes = s
        .insert_envelopes(&batch, NOW + 1, limits)
        .or_fail("insert_envelopes")?;
    use InsertOutcome::*;
    same(
        "insert_envelopes outcomes",
        &outcomes,
        &vec![
            Duplicate,
            Stored,
            Stored,
            Duplicate,
            Stored,
            TooManyEnvelopes,
            TooManyBytes,
            Stored,
        ],
    )?;
    same(
        "list_envelopes() of a after the batch",
        &list_all(s, &a)?,
        &vec![env(1, 10, 1), env(2, 10, 2), env(3, 10, 3)],
    )?;
    same(
        "list_envelopes() of b after the batch",
        &list_all(s, &b)?,
        &vec![env(2, 10, 2), env(6, 990, 6)],
    )?;
    same(
        "insert_envelopes of an empty batch",
        &s.insert_envelopes(&[], NOW + 2, limits)
            .or_fail("insert_envelopes")?,
        &Vec::new(),
    )?;
    Ok(())
}

fn list(s: &mut dyn RelayStorage) -> Outcome {
    let (a, b) = (Device::new(1).mailbox(), Device::new(2).mailbox());
    // Ids in descending order, times ascending, sizes 10, 20, 30, 40, 50.
    for (i, k) in [9u8, 7, 5, 3, 1].into_iter().enumerate() {
        insert_stored(s, &a, &env(k, 10 * (i + 1), k), NOW + i as u64)?;
    }
    insert_stored(s, &b, &env(2, 10, 2), NOW)?;
    let list = |s: &dyn RelayStorage, since: u64, limit: u32, max_bytes: u64| {
        s.list_envelopes(&a, since, limit, max_bytes)
            .map(|l| ids(&l))
            .or_fail("list_envelopes")
    };
    same(
        "list_envelopes() (oldest first)",
        &list(s, 0, 100, u64::MAX)?,
        &vec![9, 7, 5, 3, 1],
    )?;
    same(
        "list_envelopes() whole",
        &list_all(s, &a)?.get(1).cloned(),
        &Some(env(7, 20, 7)),
    )?;
    same(
        "list_envelopes() with limit 2",
        &list(s, 0, 2, u64::MAX)?,
        &vec![9, 7],
    )?;
    same(
        "list_envelopes() with limit 1",
        &list(s, 0, 1, u64::MAX)?,
        &vec![9],
    )?;
    same(
        "list_envelopes() with max_bytes 60 (10 + 20 + 30)",
        &list(s, 0, 100, 60)?,
        &vec![9, 7, 5],
    )?;
    same(
        "list_envelopes() with max_bytes 59",
        &list(s, 0, 100, 59)?,
        &vec![9, 7],
    )?;
    same(
        "list_envelopes() with max_bytes 1 (the first always)",
        &list(s, 0, 100, 1)?,
        &vec![9],
    )?;
    same(
        "list_envelopes() received since NOW + 2",
        &list(s, NOW + 2, 100, u64::MAX)?,
        &vec![5, 3, 1],
    )?;
    same(
        "list_envelopes() received since NOW + 3 with max_bytes 10 (the first always)",
        &list(s, NOW + 3, 100, 10)?,
        &vec![3],
    )?;
    same(
        "list_envelopes() received since after the last",
        &list(s, NOW + 5, 100, u64::MAX)?,
        &Vec::new(),
    )?;
    same("list_envelopes() of b", &ids(&list_all(s, &b)?), &vec![2])?;
    usage_is(s, &a, "after listing", 5, 150)?;
    Ok(())
}

fn acknowledge(s: &mut dyn RelayStorage) -> Outcome {
    let (a, b) = (Device::new(1).mailbox(), Device::new(2).mailbox());
    for k in 1..=4 {
        insert_stored(s, &a, &env(k, 10, k), NOW)?;
    }
    insert_stored(s, &b, &env(2, 10, 2), NOW)?;
    let ack = |s: &mut dyn RelayStorage, m: &MailboxId, ks: &[u8]| {
        let ids: Vec<EnvelopeId> = ks.iter().map(|&k| eid(k)).collect();
        s.acknowledge_envelopes(m, &ids)
            .or_fail("acknowledge_envelopes")
    };
    same(
        "acknowledge_envelopes([2, 4, 99]) (99 unknown)",
        &ack(s, &a, &[2, 4, 99])?,
        &2,
    )?;
    same(
        "list_envelopes() after acknowledging 2 and 4",
        &ids(&list_all(s, &a)?),
        &vec![1, 3],
    )?;
    same(
        "another mailbox's envelope with an acknowledged id",
        &ids(&list_all(s, &b)?),
        &vec![2],
    )?;
    same("acknowledge_envelopes([2]) again", &ack(s, &a, &[2])?, &0)?;
    same("acknowledge_envelopes([]) ", &ack(s, &a, &[])?, &0)?;
    same(
        "acknowledge_envelopes of a's ids in a mailbox without them",
        &ack(s, &Device::new(3).mailbox(), &[1, 3])?,
        &0,
    )?;
    same(
        "insert_envelope of an acknowledged id",
        &s.insert_envelope(&a, &env(2, 10, 9), Share::Contacts, NOW + 1, OPEN)
            .or_fail("insert_envelope")?,
        &InsertOutcome::Duplicate,
    )?;
    same(
        "list_envelopes() after re-inserting an acknowledged id",
        &ids(&list_all(s, &a)?),
        &vec![1, 3],
    )?;
    same(
        "acknowledge_envelopes([1, 1, 3]) (a repeated id)",
        &ack(s, &a, &[1, 1, 3])?,
        &2,
    )?;
    same(
        "list_envelopes() when all acknowledged",
        &list_all(s, &a)?,
        &Vec::new(),
    )?;
    Ok(())
}

fn usage_check(s: &mut dyn RelayStorage) -> Outcome {
    let (a, b) = (Device::new(1).mailbox(), Device::new(2).mailbox());
    insert_stored(s, &a, &env(1, 100, 1), NOW)?;
    insert_stored(s, &a, &env(2, 50, 2), NOW + 10)?;
    insert_stored(s, &b, &env(1, 7, 1), NOW)?;
    usage_is(s, &a, "after two inserts", 2, 150)?;
    usage_is(s, &b, "of another mailbox", 1, 7)?;
    s.insert_envelope(&a, &env(1, 999, 1), Share::Contacts, NOW, OPEN)
        .or_fail("insert_envelope")?;
    usage_is(s, &a, "after a duplicate", 2, 150)?;
    let full = MailboxLimits {
        max_envelopes: 2,
        ..OPEN
    };
    s.insert_envelope(&a, &env(3, 30, 3), Share::Contacts, NOW, full)
        .or_fail("insert_envelope")?;
    usage_is(s, &a, "after a refused insert", 2, 150)?;
    insert_stored(s, &a, &env(3, 30, 3), NOW + 20)?;
    usage_is(s, &a, "after a third insert", 3, 180)?;
    s.acknowledge_envelopes(&a, &[eid(2), eid(9)])
        .or_fail("acknowledge_envelopes")?;
    usage_is(s, &a, "after acknowledging 50 bytes", 2, 130)?;
    // Expired by listing's cutoff but not deleted: still counted.
    same(
        "list_envelopes() since NOW + 1",
        &ids(&s
            .list_envelopes(&a, NOW + 1, 100, u64::MAX)
            .or_fail("list_envelopes")?),
        &vec![3],
    )?;
    usage_is(s, &a, "with an expired envelope not yet deleted", 2, 130)?;
    s.expire_envelopes(NOW + 1).or_fail("expire_envelopes")?;
    usage_is(s, &a, "after expiring 100 bytes", 1, 30)?;
    usage_is(s, &b, "of b after expiring everything before NOW + 1", 0, 0)?;
    s.acknowledge_envelopes(&a, &[eid(3)])
        .or_fail("acknowledge_envelopes")?;
    usage_is(s, &a, "when empty again", 0, 0)?;
    Ok(())
}

fn expiry(s: &mut dyn RelayStorage) -> Outcome {
    let (a, b) = (Device::new(1).mailbox(), Device::new(2).mailbox());
    insert_stored(s, &a, &env(1, 10, 1), NOW - 2)?;
    insert_stored(s, &a, &env(2, 10, 2), NOW - 1)?;
    insert_stored(s, &a, &env(3, 10, 3), NOW)?;
    insert_stored(s, &b, &env(1, 10, 1), NOW - 1)?;
    s.acknowledge_envelopes(&a, &[eid(1)])
        .or_fail("acknowledge_envelopes")?;
    same(
        "expire_envelopes(NOW) (a: 1 acknowledged, 2 before; b: 1 before)",
        &s.expire_envelopes(NOW).or_fail("expire_envelopes")?,
        &2,
    )?;
    same(
        "list_envelopes() of a after expiry",
        &ids(&list_all(s, &a)?),
        &vec![3],
    )?;
    same(
        "list_envelopes() of b after expiry",
        &list_all(s, &b)?,
        &Vec::new(),
    )?;
    same(
        "insert_envelope of an acknowledged id after its expiry",
        &s.insert_envelope(&a, &env(1, 10, 1), Share::Contacts, NOW, OPEN)
            .or_fail("insert_envelope")?,
        &InsertOutcome::Stored,
    )?;
    same(
        "insert_envelope of an expired id",
        &s.insert_envelope(&a, &env(2, 10, 2), Share::Contacts, NOW, OPEN)
            .or_fail("insert_envelope")?,
        &InsertOutcome::Stored,
    )?;
    same(
        "expire_envelopes(NOW) again (nothing received before NOW)",
        &s.expire_envelopes(NOW).or_fail("expire_envelopes")?,
        &0,
    )?;
    same(
        "list_envelopes() of a",
        &ids(&list_all(s, &a)?),
        &vec![3, 1, 2],
    )?;

    // insert_envelope expires the mailbox first: a full mailbox of old
    // envelopes takes a new one, and an old acknowledged id is new again.
    let c = Device::new(3).mailbox();
    insert_stored(s, &c, &env(1, 10, 1), NOW - 10)?;
    insert_stored(s, &c, &env(2, 10, 2), NOW - 10)?;
    insert_stored(s, &c, &env(3, 10, 3), NOW)?;
    s.acknowledge_envelopes(&c, &[eid(2)])
        .or_fail("acknowledge_envelopes")?;
    let limits = MailboxLimits {
        max_stranger_envelopes: u32::MAX,
        max_stranger_bytes: u64::MAX,
        max_envelopes: 2,
        max_bytes: 20,
        expire_before: NOW - 9,
    };
    same(
        "insert_envelope with expire_before after an acknowledged id's receipt",
        &s.insert_envelope(&c, &env(2, 10, 2), Share::Contacts, NOW, limits)
            .or_fail("insert_envelope")?,
        &InsertOutcome::Stored,
    )?;
    same(
        "list_envelopes() after an insert that expired the mailbox",
        &ids(&list_all(s, &c)?),
        &vec![3, 2],
    )?;
    usage_is(s, &c, "after an insert that expired the mailbox", 2, 20)?;
    Ok(())
}

fn challenges(s: &mut dyn RelayStorage) -> Outcome {
    let (a, b) = (Device::new(1).mailbox(), Device::new(2).mailbox());
    ensure!(
        consume(s, &a, 1, NOW, NOW + 300)?,
        "consume_challenge() of a challenge never used is false"
    );
    ensure!(
        !consume(s, &a, 1, NOW + 1, NOW + 300)?,
        "consume_challenge() of a challenge already used is true (not single use)"
    );
    ensure!(
        consume(s, &b, 1, NOW + 1, NOW + 300)?,
        "consume_challenge() of a challenge used in another mailbox is false (not per mailbox)"
    );
    ensure!(
        consume(s, &a, 2, NOW + 1, NOW + 300)?,
        "consume_challenge() of another challenge of a mailbox is false"
    );

    // A record is kept up to its expiry time, inclusive, and deleted by
    // the mailbox's next use after it.
    ensure!(
        consume(s, &a, 3, NOW, NOW + 10)?,
        "consume_challenge() of a challenge never used is false"
    );
    ensure!(
        !consume(s, &a, 3, NOW + 10, NOW + 10)?,
        "a used challenge was forgotten at its expiry time (now == expires_at)"
    );
    ensure!(
        consume(s, &a, 4, NOW + 11, NOW + 300)?,
        "consume_challenge() of a challenge never used is false"
    );
    same(
        "purge_challenges(NOW + 11) after the mailbox's use at NOW + 11 deleted its expired record",
        &s.purge_challenges(NOW + 11).or_fail("purge_challenges")?,
        &0,
    )?;

    // purge_challenges: expires_at < now only, every mailbox.
    ensure!(
        consume(s, &a, 30, NOW, NOW + 400)?,
        "a new challenge is used"
    );
    ensure!(
        consume(s, &a, 31, NOW, NOW + 500)?,
        "a new challenge is used"
    );
    ensure!(
        consume(s, &b, 32, NOW, NOW + 350)?,
        "a new challenge is used"
    );
    // Now: a holds 1, 2, 4 (NOW + 300), 30 (+ 400), 31 (+ 500); b holds 1
    // (+ 300), 32 (+ 350).
    same(
        "purge_challenges(NOW + 400)",
        &s.purge_challenges(NOW + 400).or_fail("purge_challenges")?,
        &5,
    )?;
    ensure!(
        !consume(s, &a, 30, NOW + 400, NOW + 400)?,
        "purge_challenges() deleted a record expiring at `now`"
    );
    ensure!(
        !consume(s, &a, 31, NOW + 400, NOW + 500)?,
        "purge_challenges() deleted a record expiring after `now`"
    );
    ensure!(
        consume(s, &b, 32, NOW + 400, NOW + 400)?,
        "a purged record (another mailbox's) is still there"
    );
    same(
        "purge_challenges(NOW + 501)",
        &s.purge_challenges(NOW + 501).or_fail("purge_challenges")?,
        &3,
    )?;
    Ok(())
}

fn relay_key(s: &mut dyn RelayStorage) -> Outcome {
    let first = RelayKey::from_bytes([0x11; 32]);
    let second = RelayKey::from_bytes([0x22; 32]);
    let got = s.relay_key(Some(&first)).or_fail("relay_key")?;
    ensure!(
        got.as_ref() == Some(&first),
        "relay_key(Some(key)) of a storage without one did not return that key"
    );
    let got = s.relay_key(Some(&second)).or_fail("relay_key")?;
    ensure!(
        got.as_ref() == Some(&first),
        "relay_key(Some(another key)) replaced the stored key (or returned another)"
    );
    let got = s.relay_key(None).or_fail("relay_key")?;
    ensure!(
        got.as_ref() == Some(&first),
        "relay_key(None) did not return the stored key"
    );
    Ok(())
}

fn claim_budget(s: &mut dyn RelayStorage) -> Outcome {
    let (a, b, c) = (Device::new(1), Device::new(2), Device::new(3));
    apply(s, &a.upload(1, &[1, 2, 3, 4, 5, 6], 1, false), NOW, 100)?;
    apply(s, &b.upload(1, &[7], 1, false), NOW, 100)?;
    apply(s, &c.upload(1, &[], 1, false), NOW, 100)?;
    // A burst of 3, then one a second.
    let at = |ms: u64| ClaimBudget {
        now_ms: NOW * 1000 + ms,
        interval_ms: 1000,
        tolerance_ms: 2000,
    };
    for id in 1..=3 {
        same(
            &format!("claim {id} of a burst of 3"),
            &claim_with(s, &a.address, at(0))?,
            &ClaimOutcome::Claimed(id, opk(id, 1)),
        )?;
    }
    same(
        "a 4th claim in a burst of 3",
        &claim_with(s, &a.address, at(0))?,
        &ClaimOutcome::Limited,
    )?;
    same(
        "one_time_prekey_count() after a limited claim",
        &count(s, &a.address)?,
        &3,
    )?;
    same(
        "a claim 999 ms after a spent burst (one a second)",
        &claim_with(s, &a.address, at(999))?,
        &ClaimOutcome::Limited,
    )?;
    same(
        "a claim 1 s after a spent burst (the stored claim time was lost?)",
        &claim_with(s, &a.address, at(1000))?,
        &ClaimOutcome::Claimed(4, opk(4, 1)),
    )?;
    same(
        "a second claim 1 s after a spent burst",
        &claim_with(s, &a.address, at(1000))?,
        &ClaimOutcome::Limited,
    )?;
    // An upload keeps the claim time.
    apply(s, &a.upload(2, &[8], 1, false), NOW, 100)?;
    same(
        "a claim right after an upload (the upload reset the claim time)",
        &claim_with(s, &a.address, at(1000))?,
        &ClaimOutcome::Limited,
    )?;
    // Another device has a budget of its own.
    same(
        "a claim of another device",
        &claim_with(s, &b.address, at(1000))?,
        &ClaimOutcome::Claimed(7, opk(7, 1)),
    )?;
    // An empty pool spends nothing.
    for _ in 0..5 {
        same(
            "a claim of an empty pool",
            &claim_with(s, &c.address, at(0))?,
            &ClaimOutcome::Empty,
        )?;
    }
    apply(s, &c.upload(2, &[9, 10, 11], 1, false), NOW, 100)?;
    for id in 9..=11 {
        same(
            &format!("claim {id} after claims of an empty pool (they spent the budget)"),
            &claim_with(s, &c.address, at(0))?,
            &ClaimOutcome::Claimed(id, opk(id, 1)),
        )?;
    }
    // Without a budget, the claim time is not in the way.
    same(
        "a claim without a budget from a device whose budget is spent",
        &s.claim_one_time_prekey(&a.address, None)
            .or_fail("claim_one_time_prekey")?,
        &ClaimOutcome::Claimed(5, opk(5, 1)),
    )?;
    same(
        "a claim of a device without a record",
        &claim_with(s, &Device::new(4).address, at(0))?,
        &ClaimOutcome::Empty,
    )?;
    Ok(())
}

fn groups(s: &mut dyn RelayStorage) -> Outcome {
    let a = Device::new(1);
    let m = a.mailbox();
    s.begin_group().or_fail("begin_group")?;
    apply(s, &a.upload(5, &[1, 2], 1, false), NOW, 100)?;
    ensure!(
        s.mailbox_exists(&m).or_fail("mailbox_exists")?,
        "inside a group, mailbox_exists() does not see the group's upload"
    );
    same(
        "inside a group, a replayed upload",
        &s.apply_upload(&a.upload(5, &[3], 1, true), NOW, 100)
            .or_fail("apply_upload")?,
        &UploadOutcome::Replayed,
    )?;
    insert_stored(s, &m, &env(1, 10, 1), NOW)?;
    same(
        "inside a group, a duplicate",
        &s.insert_envelope(&m, &env(1, 20, 2), Share::Contacts, NOW, OPEN)
            .or_fail("insert_envelope")?,
        &InsertOutcome::Duplicate,
    )?;
    same(
        "inside a group, claim_one_time_prekey()",
        &claim_one(s, &a.address)?,
        &Some((1, opk(1, 1))),
    )?;
    ensure!(
        consume(s, &m, 1, NOW, NOW + 300)?,
        "inside a group, a new challenge cannot be used"
    );
    ensure!(
        !consume(s, &m, 1, NOW, NOW + 300)?,
        "inside a group, a challenge used in the group can be used again"
    );
    same(
        "inside a group, list_envelopes()",
        &list_all(s, &m)?,
        &vec![env(1, 10, 1)],
    )?;
    s.commit_group().or_fail("commit_group")?;

    same(
        "after the commit, device()",
        &record(s, &a)?.map(|r| r.counter),
        &Some(5),
    )?;
    same("after the commit, the pool", &count(s, &a.address)?, &1)?;
    same(
        "after the commit, list_envelopes()",
        &list_all(s, &m)?,
        &vec![env(1, 10, 1)],
    )?;
    ensure!(
        !consume(s, &m, 1, NOW, NOW + 300)?,
        "after the commit, a challenge used in the group can be used again"
    );

    // A second group, then calls outside any group.
    s.begin_group().or_fail("begin_group")?;
    s.acknowledge_envelopes(&m, &[eid(1)])
        .or_fail("acknowledge_envelopes")?;
    insert_stored(s, &m, &env(2, 10, 2), NOW)?;
    s.commit_group().or_fail("commit_group")?;
    insert_stored(s, &m, &env(3, 10, 3), NOW)?;
    same(
        "after a second group and an insert outside a group",
        &ids(&list_all(s, &m)?),
        &vec![2, 3],
    )?;
    s.begin_group().or_fail("begin_group")?;
    s.commit_group().or_fail("commit_group")?;
    usage_is(s, &m, "after an empty group", 2, 20)?;
    Ok(())
}

fn large_values(s: &mut dyn RelayStorage) -> Outcome {
    let a = Device::new(1);
    let mut upload = a.upload(u64::MAX - 1, &[u32::MAX], 1, false);
    // The storage keeps what it is given: a creation time the protocol
    // would refuse (above MAX_TIMESTAMP) must still round trip.
    let spk = SignedPrekey::from_secret(&a.keys, u32::MAX, NOW, [9; 32]).expect("a time in range");
    upload.signed_prekey = SignedPrekeyRecord {
        created: u64::MAX,
        ..SignedPrekeyRecord::of(&spk)
    };
    apply(s, &upload, NOW, u32::MAX)?;
    let got = record(s, &a)?;
    same(
        "device() of an upload with counter 2^64 - 2 and a prekey created at 2^64 - 1",
        &got.map(|r| (r.counter, r.signed_prekey)),
        &Some((u64::MAX - 1, upload.signed_prekey)),
    )?;
    same(
        "one_time_prekey_count() with a bound of u32::MAX",
        &count(s, &a.address)?,
        &1,
    )?;
    same(
        "claim_one_time_prekey() of id u32::MAX",
        &claim_one(s, &a.address)?,
        &Some((u32::MAX, opk(u32::MAX, 1))),
    )?;
    same(
        "apply_upload with counter 2^63 after 2^64 - 2",
        &s.apply_upload(&a.upload(1 << 63, &[], 1, false), NOW, 10)
            .or_fail("apply_upload")?,
        &UploadOutcome::Replayed,
    )?;
    apply(s, &a.upload(u64::MAX, &[], 1, false), NOW, 10)?;
    let m = a.mailbox();
    ensure!(
        consume(s, &m, 1, NOW, u64::MAX)?,
        "consume_challenge() of a new challenge expiring at u64::MAX is false"
    );
    s.purge_challenges(u64::MAX).or_fail("purge_challenges")?;
    ensure!(
        !consume(s, &m, 1, u64::MAX, u64::MAX)?,
        "a used challenge expiring at u64::MAX was forgotten"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Device lists (the storage does not parse them: made-up bytes do).

/// A made-up stored list: version, a body hash and bytes derived from
/// `salt`.
fn dl(version: u64, salt: u8) -> StoredDeviceList {
    let mut body_hash = [salt; 32];
    body_hash[..8].copy_from_slice(&version.to_be_bytes());
    let mut signed = vec![salt; 40 + usize::from(salt % 7)];
    signed[..8].copy_from_slice(&version.to_be_bytes());
    StoredDeviceList {
        version,
        body_hash,
        signed,
    }
}

fn append(
    s: &mut dyn RelayStorage,
    account: &AccountId,
    list: &StoredDeviceList,
    previous: &[u8; 32],
    retain: u32,
) -> Result<AppendOutcome, String> {
    s.append_device_list(account, list, previous, retain)
        .or_fail("append_device_list")
}

fn versions(s: &dyn RelayStorage, account: &AccountId) -> Result<Vec<u64>, String> {
    Ok(s.device_lists_after(account, 0, u32::MAX)
        .or_fail("device_lists_after")?
        .iter()
        .map(|l| l.version)
        .collect())
}

fn device_lists(s: &mut dyn RelayStorage) -> Outcome {
    let (a, b) = (AccountId([0xa1; 32]), AccountId([0xb2; 32]));
    same(
        "device_list_head() of a new storage",
        &s.device_list_head(&a).or_fail("device_list_head")?,
        &None,
    )?;
    same(
        "device_list_version(1) of a new storage",
        &s.device_list_version(&a, 1)
            .or_fail("device_list_version")?,
        &None,
    )?;
    same(
        "device_lists_after(0) of a new storage",
        &versions(s, &a)?,
        &vec![],
    )?;
    same(
        "append_device_list(version 2) with no stored version",
        &append(s, &a, &dl(2, 1), &[0; 32], 64)?,
        &AppendOutcome::HeadMoved,
    )?;
    same(
        "versions after a refused version 2",
        &versions(s, &a)?,
        &vec![],
    )?;
    let v1 = dl(1, 1);
    same(
        "append_device_list(version 1)",
        &append(s, &a, &v1, &[0; 32], 64)?,
        &AppendOutcome::Appended,
    )?;
    same(
        "device_list_head() after version 1",
        &s.device_list_head(&a).or_fail("device_list_head")?,
        &Some(v1.clone()),
    )?;
    same(
        "append_device_list(another version 1)",
        &append(s, &a, &dl(1, 2), &[0; 32], 64)?,
        &AppendOutcome::HeadMoved,
    )?;
    same(
        "device_list_version(1) after another version 1 was refused",
        &s.device_list_version(&a, 1)
            .or_fail("device_list_version")?,
        &Some(v1.clone()),
    )?;
    same(
        "append_device_list(version 2 naming another previous hash)",
        &append(s, &a, &dl(2, 3), &[0xee; 32], 64)?,
        &AppendOutcome::HeadMoved,
    )?;
    same(
        "append_device_list(version 3 over head 1)",
        &append(s, &a, &dl(3, 3), &v1.body_hash, 64)?,
        &AppendOutcome::HeadMoved,
    )?;
    same(
        "versions after refused appends",
        &versions(s, &a)?,
        &vec![1],
    )?;
    let v2 = dl(2, 4);
    same(
        "append_device_list(version 2 over version 1)",
        &append(s, &a, &v2, &v1.body_hash, 64)?,
        &AppendOutcome::Appended,
    )?;
    same(
        "append_device_list(a second version 2 over version 1: a fork)",
        &append(s, &a, &dl(2, 5), &v1.body_hash, 64)?,
        &AppendOutcome::HeadMoved,
    )?;
    same(
        "device_list_version(2) after a fork was refused",
        &s.device_list_version(&a, 2)
            .or_fail("device_list_version")?,
        &Some(v2.clone()),
    )?;
    same(
        "device_list_head() after a fork was refused",
        &s.device_list_head(&a).or_fail("device_list_head")?,
        &Some(v2.clone()),
    )?;
    same(
        "device_lists_after(0)",
        &s.device_lists_after(&a, 0, 64)
            .or_fail("device_lists_after")?,
        &vec![v1.clone(), v2.clone()],
    )?;
    // Another account: separate chain, its own version 1.
    same(
        "device_list_head() of another account",
        &s.device_list_head(&b).or_fail("device_list_head")?,
        &None,
    )?;
    let b1 = dl(1, 6);
    same(
        "append_device_list(version 1 of another account)",
        &append(s, &b, &b1, &[0; 32], 64)?,
        &AppendOutcome::Appended,
    )?;
    same(
        "versions of the first account",
        &versions(s, &a)?,
        &vec![1, 2],
    )?;
    same(
        "device_list_version(1) of the other account",
        &s.device_list_version(&b, 1)
            .or_fail("device_list_version")?,
        &Some(b1),
    )?;
    Ok(())
}

fn device_list_retention(s: &mut dyn RelayStorage) -> Outcome {
    let a = AccountId([0xc3; 32]);
    let lists: Vec<StoredDeviceList> = (1..=6u8).map(|v| dl(u64::from(v), v)).collect();
    let mut previous = [0u8; 32];
    for list in &lists {
        same(
            &format!("append_device_list(version {}) with retain 3", list.version),
            &append(s, &a, list, &previous, 3)?,
            &AppendOutcome::Appended,
        )?;
        previous = list.body_hash;
    }
    same(
        "versions kept with retain 3",
        &versions(s, &a)?,
        &vec![4, 5, 6],
    )?;
    same(
        "device_list_version(3) after retention dropped it",
        &s.device_list_version(&a, 3)
            .or_fail("device_list_version")?,
        &None,
    )?;
    same(
        "device_lists_after(4, 64)",
        &s.device_lists_after(&a, 4, 64)
            .or_fail("device_lists_after")?,
        &lists[4..].to_vec(),
    )?;
    same(
        "device_lists_after(0, 2)",
        &s.device_lists_after(&a, 0, 2)
            .or_fail("device_lists_after")?,
        &lists[3..5].to_vec(),
    )?;
    same(
        "device_lists_after(6, 64)",
        &s.device_lists_after(&a, 6, 64)
            .or_fail("device_lists_after")?,
        &vec![],
    )?;
    same(
        "device_lists_after(u64::MAX, 64)",
        &s.device_lists_after(&a, u64::MAX, 64)
            .or_fail("device_lists_after")?,
        &vec![],
    )?;
    same(
        "device_list_head() after retention",
        &s.device_list_head(&a).or_fail("device_list_head")?,
        &Some(lists[5].clone()),
    )?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Shares, access verifiers, owners seen, inactive mailboxes, idle devices.

/// Inserts into a share: the outcome.
fn put(
    s: &mut dyn RelayStorage,
    m: &MailboxId,
    e: &Envelope,
    share: Share,
    at: u64,
    limits: MailboxLimits,
) -> Result<InsertOutcome, String> {
    s.insert_envelope(m, e, share, at, limits)
        .or_fail("insert_envelope")
}

/// The full usage of a mailbox: both shares, then the strangers' share.
fn usage_full(
    s: &dyn RelayStorage,
    m: &MailboxId,
    when: &str,
    (envelopes, bytes): (u64, u64),
    (stranger_envelopes, stranger_bytes): (u64, u64),
) -> Outcome {
    same(
        &format!("mailbox_usage {when}"),
        &usage(s, m)?,
        &MailboxUsage {
            envelopes,
            bytes,
            stranger_envelopes,
            stranger_bytes,
        },
    )
}

fn shares(s: &mut dyn RelayStorage) -> Outcome {
    use InsertOutcome::*;
    use Share::{Contacts, Strangers};
    let (m, n) = (Device::new(1).mailbox(), Device::new(2).mailbox());
    // Two envelopes and 100 bytes for contacts, two and 50 for strangers.
    let limits = MailboxLimits {
        max_envelopes: 2,
        max_bytes: 100,
        max_stranger_envelopes: 2,
        max_stranger_bytes: 50,
        expire_before: 0,
    };
    // The strangers' share fills up.
    let steps: [(u8, usize, Share, u64, InsertOutcome, &str); 10] = [
        (1, 30, Strangers, NOW - 10, Stored, "a stranger's 30 bytes"),
        (
            2,
            21,
            Strangers,
            NOW,
            TooManyBytes,
            "21 more strangers' bytes (max 50)",
        ),
        (
            2,
            20,
            Strangers,
            NOW,
            Stored,
            "20 more strangers' bytes (exactly 50)",
        ),
        (
            3,
            0,
            Strangers,
            NOW,
            TooManyEnvelopes,
            "a third stranger's envelope (max 2)",
        ),
        // Contacts are not counted against it, nor it against them.
        (
            4,
            60,
            Contacts,
            NOW,
            Stored,
            "a contact's 60 bytes beside a full strangers' share",
        ),
        (
            5,
            40,
            Contacts,
            NOW,
            Stored,
            "a contact's 40 more (exactly 100)",
        ),
        (
            6,
            0,
            Contacts,
            NOW,
            TooManyEnvelopes,
            "a third contact's envelope (max 2)",
        ),
        // Ids span the shares, even where the other share has room.
        (
            1,
            5,
            Contacts,
            NOW,
            Duplicate,
            "a stranger's pending id as a contact's",
        ),
        (
            4,
            5,
            Strangers,
            NOW,
            Duplicate,
            "a contact's pending id as a stranger's",
        ),
        (
            3,
            0,
            Strangers,
            NOW,
            TooManyEnvelopes,
            "a stranger's envelope into its full share",
        ),
    ];
    for (k, len, share, at, want, what) in steps {
        same(
            &format!("insert_envelope of {what}"),
            &put(s, &m, &env(k, len, k), share, at, limits)?,
            &want,
        )?;
    }
    same(
        "list_envelopes() of both shares (deposit order)",
        &ids(&list_all(s, &m)?),
        &vec![1, 2, 4, 5],
    )?;
    usage_full(s, &m, "with both shares full", (4, 150), (2, 50))?;

    // A full contacts' share does not stop strangers.
    same(
        "insert_envelope of a contact's envelope (mailbox n)",
        &put(s, &n, &env(1, 100, 1), Contacts, NOW, limits)?,
        &Stored,
    )?;
    same(
        "insert_envelope of a contact's 1 byte over max_bytes (mailbox n)",
        &put(s, &n, &env(2, 1, 2), Contacts, NOW, limits)?,
        &TooManyBytes,
    )?;
    same(
        "insert_envelope of a stranger's envelope beside a full contacts' share",
        &put(s, &n, &env(2, 1, 2), Strangers, NOW, limits)?,
        &Stored,
    )?;
    usage_full(s, &n, "of mailbox n", (2, 101), (1, 1))?;

    // An acknowledgment frees room in its share only, and its id stays a
    // duplicate in either share.
    same(
        "acknowledge_envelopes() of a stranger's envelope",
        &s.acknowledge_envelopes(&m, &[eid(2)])
            .or_fail("acknowledge_envelopes")?,
        &1,
    )?;
    usage_full(
        s,
        &m,
        "after acknowledging a stranger's 20 bytes",
        (3, 130),
        (1, 30),
    )?;
    same(
        "insert_envelope of a contact's envelope after a stranger's was acknowledged",
        &put(s, &m, &env(6, 0, 6), Contacts, NOW, limits)?,
        &TooManyEnvelopes,
    )?;
    same(
        "insert_envelope of an acknowledged stranger's id as a contact's",
        &put(s, &m, &env(2, 1, 2), Contacts, NOW, limits)?,
        &Duplicate,
    )?;
    same(
        "insert_envelope of a stranger's 20 bytes after an acknowledgment (refilled)",
        &put(s, &m, &env(7, 20, 7), Strangers, NOW, limits)?,
        &Stored,
    )?;
    same(
        "acknowledge_envelopes() of a contact's envelope",
        &s.acknowledge_envelopes(&m, &[eid(5)])
            .or_fail("acknowledge_envelopes")?,
        &1,
    )?;
    usage_full(
        s,
        &m,
        "after acknowledging a contact's 40 bytes",
        (3, 110),
        (2, 50),
    )?;
    same(
        "insert_envelope of a stranger's envelope after a contact's was acknowledged",
        &put(s, &m, &env(8, 0, 8), Strangers, NOW, limits)?,
        &TooManyEnvelopes,
    )?;
    same(
        "insert_envelope of a contact's 40 bytes after an acknowledgment (refilled)",
        &put(s, &m, &env(9, 40, 9), Contacts, NOW, limits)?,
        &Stored,
    )?;
    usage_full(s, &m, "with both shares full again", (4, 150), (2, 50))?;

    // Expiry: the stranger's envelope 1 (NOW - 10) goes, its share refills.
    same(
        "expire_envelopes(NOW - 5)",
        &s.expire_envelopes(NOW - 5).or_fail("expire_envelopes")?,
        &1,
    )?;
    usage_full(
        s,
        &m,
        "after a stranger's envelope expired",
        (3, 120),
        (1, 20),
    )?;
    same(
        "insert_envelope of a stranger's 30 bytes after an expiry (refilled)",
        &put(s, &m, &env(10, 30, 10), Strangers, NOW, limits)?,
        &Stored,
    )?;
    // And by expire_before: a strangers' share full of old envelopes.
    let o = Device::new(3).mailbox();
    for k in 1..=2 {
        same(
            "insert_envelope of an old stranger's envelope",
            &put(s, &o, &env(k, 25, k), Strangers, NOW - 10, limits)?,
            &Stored,
        )?;
    }
    same(
        "insert_envelope of a contact's envelope (mailbox o)",
        &put(s, &o, &env(3, 10, 3), Contacts, NOW - 10, limits)?,
        &Stored,
    )?;
    let expiring = MailboxLimits {
        expire_before: NOW - 9,
        ..limits
    };
    same(
        "insert_envelope of a stranger's envelope into a full share of expired ones",
        &put(s, &o, &env(4, 50, 4), Strangers, NOW, expiring)?,
        &Stored,
    )?;
    usage_full(
        s,
        &o,
        "after an insert that expired the mailbox",
        (1, 50),
        (1, 50),
    )?;

    // A batch counts its earlier envelopes per share.
    let b = Device::new(4).mailbox();
    let one = MailboxLimits {
        max_envelopes: 1,
        max_bytes: 100,
        max_stranger_envelopes: 1,
        max_stranger_bytes: 100,
        expire_before: 0,
    };
    let batch = vec![
        (b, env(1, 10, 1), Strangers),
        (b, env(2, 10, 2), Strangers),
        (b, env(3, 10, 3), Contacts),
        (b, env(1, 10, 1), Contacts),
        (b, env(4, 10, 4), Contacts),
    ];
    same(
        "insert_envelopes outcomes (one envelope per share)",
        &s.insert_envelopes(&batch, NOW, one)
            .or_fail("insert_envelopes")?,
        &vec![
            Stored,
            TooManyEnvelopes,
            Stored,
            Duplicate,
            TooManyEnvelopes,
        ],
    )?;
    same(
        "list_envelopes() after the batch",
        &ids(&list_all(s, &b)?),
        &vec![1, 3],
    )?;
    usage_full(s, &b, "after the batch", (2, 20), (1, 10))?;
    Ok(())
}

fn verifier(n: u8) -> AccessVerifier {
    AccessVerifier([n; 32])
}

/// An upload of `d` with `counter`, no one-time prekeys, and `access`.
fn upload_with(d: &Device, counter: u64, access: Option<AccessVerifier>) -> BundleSetUpload {
    let mut upload = d.upload(counter, &[], 1, false);
    upload.access_verifier = access;
    upload
}

fn access(s: &mut dyn RelayStorage) -> Outcome {
    let (a, b) = (Device::new(1), Device::new(2));
    let expect = |published_at: u64,
                  counter: u64,
                  access: Option<u8>,
                  previous_access: Option<u8>,
                  access_changed_at: u64| {
        Some(DeviceRecord {
            device: a.address,
            counter,
            signed_prekey: a.signed_prekey,
            published_at,
            access: access.map(verifier),
            previous_access: previous_access.map(verifier),
            access_changed_at,
            owner_seen_at: published_at,
        })
    };
    let steps: [(u64, u64, Option<u8>, _, &str); 6] = [
        (
            1,
            NOW,
            None,
            expect(NOW, 1, None, None, 0),
            "a first upload without a verifier",
        ),
        (
            2,
            NOW + 1,
            Some(1),
            expect(NOW + 1, 2, Some(1), None, NOW + 1),
            "an upload with a first verifier",
        ),
        (
            3,
            NOW + 2,
            None,
            expect(NOW + 2, 3, Some(1), None, NOW + 1),
            "an upload without a verifier (keeps it)",
        ),
        (
            4,
            NOW + 3,
            Some(1),
            expect(NOW + 3, 4, Some(1), None, NOW + 1),
            "an upload with the same verifier (keeps it)",
        ),
        (
            5,
            NOW + 4,
            Some(2),
            expect(NOW + 4, 5, Some(2), Some(1), NOW + 4),
            "an upload with another verifier (rotates)",
        ),
        (
            6,
            NOW + 5,
            None,
            expect(NOW + 5, 6, Some(2), Some(1), NOW + 4),
            "an upload without a verifier after a rotation",
        ),
    ];
    for (counter, at, v, want, what) in steps {
        apply(s, &upload_with(&a, counter, v.map(verifier)), at, 100)?;
        same(&format!("device() after {what}"), &record(s, &a)?, &want)?;
        same(
            &format!("mailbox_owner() after {what}"),
            &s.mailbox_owner(&a.mailbox()).or_fail("mailbox_owner")?,
            &want,
        )?;
    }
    // Refused uploads change nothing.
    let before = record(s, &a)?;
    same(
        "apply_upload of a replayed counter with another verifier",
        &s.apply_upload(&upload_with(&a, 6, Some(verifier(3))), NOW + 6, 100)
            .or_fail("apply_upload")?,
        &UploadOutcome::Replayed,
    )?;
    let mut over = a.upload(7, &[1, 2], 1, false);
    over.access_verifier = Some(verifier(3));
    same(
        "apply_upload over the prekey bound with another verifier",
        &s.apply_upload(&over, NOW + 6, 1).or_fail("apply_upload")?,
        &UploadOutcome::TooManyOneTimePrekeys,
    )?;
    same("device() after refused uploads", &record(s, &a)?, &before)?;
    // A rotation again: the previous one goes.
    apply(s, &upload_with(&a, 7, Some(verifier(3))), NOW + 7, 100)?;
    same(
        "device() after a second rotation",
        &record(s, &a)?,
        &expect(NOW + 7, 7, Some(3), Some(2), NOW + 7),
    )?;
    // Another device: its first upload with a verifier; its own mailbox.
    same(
        "mailbox_owner() of a mailbox without a device",
        &s.mailbox_owner(&b.mailbox()).or_fail("mailbox_owner")?,
        &None,
    )?;
    apply(s, &upload_with(&b, 1, Some(verifier(9))), NOW + 8, 100)?;
    let b_record = Some(DeviceRecord {
        device: b.address,
        counter: 1,
        signed_prekey: b.signed_prekey,
        published_at: NOW + 8,
        access: Some(verifier(9)),
        previous_access: None,
        access_changed_at: NOW + 8,
        owner_seen_at: NOW + 8,
    });
    same(
        "device() after a first upload with a verifier",
        &record(s, &b)?,
        &b_record,
    )?;
    same(
        "mailbox_owner() of the second device's mailbox",
        &s.mailbox_owner(&b.mailbox()).or_fail("mailbox_owner")?,
        &b_record,
    )?;
    same(
        "mailbox_owner() of the first device's mailbox after another device's upload",
        &s.mailbox_owner(&a.mailbox()).or_fail("mailbox_owner")?,
        &expect(NOW + 7, 7, Some(3), Some(2), NOW + 7),
    )?;
    Ok(())
}

/// `owner_seen_at` of `d` (`None` without a record).
fn seen(s: &dyn RelayStorage, d: &Device) -> Result<Option<u64>, String> {
    Ok(record(s, d)?.map(|r| r.owner_seen_at))
}

fn owner_seen(s: &mut dyn RelayStorage) -> Outcome {
    let (a, b, c) = (Device::new(1), Device::new(2), Device::new(3));
    apply(s, &a.upload(1, &[], 1, false), NOW, 100)?;
    apply(s, &b.upload(1, &[], 1, false), NOW, 100)?;
    same("owner_seen_at after an upload", &seen(s, &a)?, &Some(NOW))?;
    ensure!(
        consume(s, &a.mailbox(), 1, NOW + 100, NOW + 400)?,
        "consume_challenge() of a new challenge is false"
    );
    same(
        "owner_seen_at after a successful consume_challenge at NOW + 100",
        &seen(s, &a)?,
        &Some(NOW + 100),
    )?;
    same(
        "published_at after a consume_challenge",
        &record(s, &a)?.map(|r| r.published_at),
        &Some(NOW),
    )?;
    same(
        "another device's owner_seen_at after a's consume_challenge",
        &seen(s, &b)?,
        &Some(NOW),
    )?;
    ensure!(
        !consume(s, &a.mailbox(), 1, NOW + 200, NOW + 400)?,
        "consume_challenge() of a used challenge is true"
    );
    same(
        "owner_seen_at after a refused consume_challenge at NOW + 200",
        &seen(s, &a)?,
        &Some(NOW + 100),
    )?;
    ensure!(
        consume(s, &a.mailbox(), 2, NOW + 50, NOW + 400)?,
        "consume_challenge() of a new challenge is false"
    );
    same(
        "owner_seen_at after a successful consume_challenge at an earlier now",
        &seen(s, &a)?,
        &Some(NOW + 100),
    )?;
    // A mailbox without a device: the challenge is used, no record made.
    ensure!(
        consume(s, &c.mailbox(), 1, NOW + 300, NOW + 400)?,
        "consume_challenge() of a new challenge of a mailbox without a device is false"
    );
    same(
        "device() after a challenge of its mailbox without a record",
        &record(s, &c)?,
        &None,
    )?;
    // Uploads: a refused one leaves it, an applied one sets it.
    same(
        "a replayed upload",
        &s.apply_upload(&a.upload(1, &[], 1, false), NOW + 300, 100)
            .or_fail("apply_upload")?,
        &UploadOutcome::Replayed,
    )?;
    same(
        "owner_seen_at after a replayed upload",
        &seen(s, &a)?,
        &Some(NOW + 100),
    )?;
    apply(s, &a.upload(2, &[], 1, false), NOW + 300, 100)?;
    same(
        "owner_seen_at after an upload at NOW + 300",
        &seen(s, &a)?,
        &Some(NOW + 300),
    )?;
    ensure!(
        consume(s, &b.mailbox(), 1, NOW + 301, NOW + 400)?,
        "consume_challenge() of a new challenge is false"
    );
    same(
        "the second device's owner_seen_at after its consume_challenge",
        &seen(s, &b)?,
        &Some(NOW + 301),
    )?;
    same(
        "the first device's owner_seen_at after b's consume_challenge",
        &seen(s, &a)?,
        &Some(NOW + 300),
    )?;
    Ok(())
}

fn inactive(s: &mut dyn RelayStorage) -> Outcome {
    let (a, b, c) = (Device::new(1), Device::new(2), Device::new(3));
    // a: seen at NOW - 100 (inactive); b: seen at NOW (a challenge);
    // c: seen at NOW - 50 (the cutoff: active); mailbox d has no device.
    apply(s, &a.upload(1, &[1, 2], 1, false), NOW - 100, 100)?;
    apply(s, &b.upload(1, &[], 1, false), NOW - 100, 100)?;
    apply(s, &c.upload(1, &[], 1, false), NOW - 50, 100)?;
    ensure!(
        consume(s, &b.mailbox(), 1, NOW, NOW + 300)?,
        "consume_challenge() of a new challenge is false"
    );
    let d = Device::new(4).mailbox();
    let (ma, mb, mc) = (a.mailbox(), b.mailbox(), c.mailbox());
    let deposit = |s: &mut dyn RelayStorage, m: &MailboxId, k: u8, share: Share, at: u64| {
        let outcome = put(s, m, &env(k, 10, k), share, at, OPEN)?;
        same(
            "insert_envelope of a new id",
            &outcome,
            &InsertOutcome::Stored,
        )
    };
    deposit(s, &ma, 1, Share::Contacts, NOW - 40)?;
    deposit(s, &ma, 2, Share::Strangers, NOW - 40)?;
    deposit(s, &ma, 3, Share::Strangers, NOW - 20)?;
    deposit(s, &ma, 4, Share::Contacts, NOW - 40)?;
    deposit(s, &ma, 5, Share::Contacts, NOW)?;
    s.acknowledge_envelopes(&ma, &[eid(4)])
        .or_fail("acknowledge_envelopes")?;
    for m in [&mb, &mc, &d] {
        deposit(s, m, 1, Share::Strangers, NOW - 40)?;
    }
    same(
        "expire_inactive(NOW - 100, ..) (nobody seen before NOW - 100)",
        &s.expire_inactive(NOW - 100, u64::MAX)
            .or_fail("expire_inactive")?,
        &0,
    )?;
    same(
        "expire_inactive(NOW - 50, NOW - 20) (a: 1 and 2 before, 4 acknowledged)",
        &s.expire_inactive(NOW - 50, NOW - 20)
            .or_fail("expire_inactive")?,
        &2,
    )?;
    same(
        "list_envelopes() of the inactive mailbox",
        &ids(&list_all(s, &ma)?),
        &vec![3, 5],
    )?;
    usage_full(s, &ma, "of the inactive mailbox", (2, 20), (1, 10))?;
    for (m, which) in [
        (&mb, "a mailbox seen since"),
        (&mc, "a mailbox seen at the cutoff"),
        (&d, "a mailbox without a device"),
    ] {
        same(
            &format!("list_envelopes() of {which}"),
            &ids(&list_all(s, m)?),
            &vec![1],
        )?;
        usage_full(s, m, &format!("of {which}"), (1, 10), (1, 10))?;
    }
    same(
        "insert_envelope of an acknowledged id expired as inactive",
        &put(s, &ma, &env(4, 10, 4), Share::Contacts, NOW, OPEN)?,
        &InsertOutcome::Stored,
    )?;
    same(
        "one_time_prekey_count() of the inactive mailbox's device",
        &count(s, &a.address)?,
        &2,
    )?;
    same(
        "device() of the inactive mailbox's device",
        &record(s, &a)?.map(|r| (r.counter, r.owner_seen_at)),
        &Some((1, NOW - 100)),
    )?;
    same(
        "expire_inactive(NOW - 50, NOW - 20) again",
        &s.expire_inactive(NOW - 50, NOW - 20)
            .or_fail("expire_inactive")?,
        &0,
    )?;
    Ok(())
}

fn expire_devices_check(s: &mut dyn RelayStorage) -> Outcome {
    let (a, b, c) = (Device::new(1), Device::new(2), Device::new(3));
    // A budget of one claim an hour.
    let budget = ClaimBudget {
        now_ms: NOW * 1000,
        interval_ms: 3_600_000,
        tolerance_ms: 0,
    };
    // a: seen at NOW - 100 (idle), with a verifier, a pool, a spent claim
    // budget, envelopes (one acknowledged) and a used challenge.
    let mut upload = a.upload(50, &[1, 2, 3], 1, false);
    upload.access_verifier = Some(verifier(1));
    apply(s, &upload, NOW - 100, 100)?;
    // b: seen at NOW - 100 too, then by a challenge; c: at the cutoff.
    apply(s, &b.upload(1, &[4, 5], 1, false), NOW - 100, 100)?;
    apply(s, &c.upload(1, &[6], 1, false), NOW - 50, 100)?;
    for (d, oldest) in [(&a, 1), (&b, 4)] {
        ensure!(
            consume(s, &d.mailbox(), 1, NOW - 100, NOW + 300)?,
            "consume_challenge() of a new challenge is false"
        );
        same(
            "a claim with a budget",
            &claim_with(s, &d.address, budget)?,
            &ClaimOutcome::Claimed(oldest, opk(oldest, 1)),
        )?;
    }
    ensure!(
        consume(s, &b.mailbox(), 2, NOW, NOW + 300)?,
        "consume_challenge() of a new challenge is false"
    );
    for d in [&a, &b, &c] {
        for k in 1..=2 {
            let outcome = put(
                s,
                &d.mailbox(),
                &env(k, 10, k),
                Share::Strangers,
                NOW - 90,
                OPEN,
            )?;
            same(
                "insert_envelope of a new id",
                &outcome,
                &InsertOutcome::Stored,
            )?;
        }
        s.acknowledge_envelopes(&d.mailbox(), &[eid(1)])
            .or_fail("acknowledge_envelopes")?;
    }
    let b_before = record(s, &b)?;
    let c_before = record(s, &c)?;

    same(
        "expire_devices(NOW - 100) (nobody seen before NOW - 100)",
        &s.expire_devices(NOW - 100).or_fail("expire_devices")?,
        &0,
    )?;
    same(
        "expire_devices(NOW - 50) (a only)",
        &s.expire_devices(NOW - 50).or_fail("expire_devices")?,
        &1,
    )?;
    let ma = a.mailbox();
    same("device() of an expired device", &record(s, &a)?, &None)?;
    same(
        "mailbox_owner() of an expired device's mailbox",
        &s.mailbox_owner(&ma).or_fail("mailbox_owner")?,
        &None,
    )?;
    ensure!(
        !s.mailbox_exists(&ma).or_fail("mailbox_exists")?,
        "mailbox_exists() is true for an expired device's mailbox"
    );
    same(
        "one_time_prekey_count() of an expired device",
        &count(s, &a.address)?,
        &0,
    )?;
    same(
        "claim_one_time_prekey() of an expired device",
        &claim_one(s, &a.address)?,
        &None,
    )?;
    same(
        "list_envelopes() of an expired device's mailbox",
        &list_all(s, &ma)?,
        &Vec::new(),
    )?;
    usage_full(s, &ma, "of an expired device's mailbox", (0, 0), (0, 0))?;
    ensure!(
        consume(s, &ma, 1, NOW, NOW + 300)?,
        "a challenge used in an expired device's mailbox is still recorded"
    );

    // A re-publish starts afresh: a low counter, no verifier, a new pool
    // and a full budget, and ids of the old mailbox are new.
    apply(s, &a.upload(1, &[7, 8], 2, false), NOW, 100)?;
    same(
        "device() after the expired device publishes again",
        &record(s, &a)?,
        &Some(DeviceRecord {
            device: a.address,
            counter: 1,
            signed_prekey: a.signed_prekey,
            published_at: NOW,
            access: None,
            previous_access: None,
            access_changed_at: 0,
            owner_seen_at: NOW,
        }),
    )?;
    same(
        "a claim with a budget after the expired device published again (claim time kept?)",
        &claim_with(s, &a.address, budget)?,
        &ClaimOutcome::Claimed(7, opk(7, 2)),
    )?;
    same(
        "one_time_prekey_count() after publishing again (the old pool kept?)",
        &count(s, &a.address)?,
        &1,
    )?;
    for k in 1..=2 {
        same(
            "insert_envelope of an id of the expired mailbox (pending or acknowledged then)",
            &put(s, &ma, &env(k, 10, k), Share::Contacts, NOW, OPEN)?,
            &InsertOutcome::Stored,
        )?;
    }

    // The others keep everything.
    for (d, before, pool) in [(&b, b_before, 1u32), (&c, c_before, 1)] {
        same("device() of a device kept", &record(s, d)?, &before)?;
        same(
            "one_time_prekey_count() of a device kept",
            &count(s, &d.address)?,
            &pool,
        )?;
        same(
            "list_envelopes() of a device kept",
            &ids(&list_all(s, &d.mailbox())?),
            &vec![2],
        )?;
        same(
            "insert_envelope of an acknowledged id of a device kept",
            &put(s, &d.mailbox(), &env(1, 10, 1), Share::Contacts, NOW, OPEN)?,
            &InsertOutcome::Duplicate,
        )?;
    }
    ensure!(
        !consume(s, &b.mailbox(), 2, NOW, NOW + 300)?,
        "a challenge used in a kept device's mailbox was forgotten"
    );
    same(
        "a claim with a budget of a kept device whose budget is spent",
        &claim_with(s, &b.address, budget)?,
        &ClaimOutcome::Limited,
    )?;
    same(
        "expire_devices(NOW - 50) again",
        &s.expire_devices(NOW - 50).or_fail("expire_devices")?,
        &0,
    )?;
    Ok(())
}
