//! The high-level client: a local [`Store`] joined to an untrusted
//! [`PrekeyDirectory`] and [`Mailbox`].
//!
//! It publishes and maintains prekeys (signed-prekey rotation with a grace
//! period, one-time-prekey refill), sends bytes to peer devices (fetching
//! and verifying a bundle when there is no session yet), and receives
//! everything pending with exactly-once delivery into the store's inbox:
//!
//! - **send**: encrypt, commit the session record, the envelope (outbox)
//!   and the message (kept until the recipient acknowledges it) in one
//!   transaction, then deposit; a failed or lost deposit is retried with
//!   the same envelope id, so it lands once;
//! - **receive**: fetch, decrypt, commit a batch (session records, consumed
//!   one-time prekeys and replay digests, inbox messages, the "processed"
//!   marks of the envelopes and of the message ids shown, receipts that
//!   arrived) in one transaction, and only then acknowledge; then answer
//!   with receipts, and re-send what is due ([`Client::resend`]).
//!
//! A crash at any point therefore loses nothing and shows nothing twice;
//! a message that never gets a receipt is re-sent (on a new session when
//! the old one looks dead) until it does, or is reported failed. SPEC.md,
//! "Conversations that never die", has the rules. The client reads no clock
//! and draws no randomness of its own: `now` and `rng` are arguments, as
//! in the protocol core.
//!
//! Inside each message the client puts a small [`frame`] with the
//! sender's device number, the message id, receipts and session control
//! fields, so that none of them is visible to the relay. The envelope
//! carries no sender: a message is routed to its session by the ratchet key
//! in its header (or, for a new chain, by trying the sessions that await
//! one), and a prekey message by its IK_A and EK_A.

pub mod accounts;
pub mod frame;
pub mod pairing;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::vec::Vec;

use rand_core::CryptoRngCore;
use zeroize::{Zeroize, Zeroizing};

use crate::bounds::MaybeSend;
use crate::error::Error;
use crate::protocol::bundle::{FreshnessPolicy, PrekeyBundle};
use crate::protocol::fingerprint::SafetyNumber;
use crate::protocol::keys::{IdentityKey, IdentityKeyPair, SignedPrekey};
use crate::protocol::prekeys::PrekeyStore;
use crate::protocol::ratchet::SessionConfig;
use crate::protocol::sealed;
use crate::protocol::session::Session;
use crate::protocol::state::session_tag;
use crate::protocol::time::check_timestamp;
use crate::protocol::wire::Incoming;
use crate::storage::record::{tag_route_key, DEFAULT_ARCHIVED_SESSIONS, ROUTING_WINDOW};
use crate::storage::{
    accepted_digest, labelled_digest16, AccessKeyRecord, ContactRecord, DeliveryState, DepositDone,
    Failure, InboxMessage, LocalIdentity, MessageId, OutboxEntry, PeerRecord, PrekeyState,
    ReceiveCommit, SentMessage, SessionEntry, SessionRecord, Store, StoreError, Trust,
};
use crate::transport::stamp::{required_bits, Stamp};
use crate::transport::{
    AccessKey, BundleSetUpload, DepositPass, DeviceAddress, Envelope, EnvelopeId, Mailbox,
    MailboxAuth, MailboxId, MailboxOp, PrekeyDirectory, TransportError,
};
use frame::Frame;

/// The client's settings. The defaults are documented on each field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientConfig {
    /// This device's number (default 1).
    pub device_id: u32,
    /// How old a peer's signed prekey may be (default 30 days).
    pub freshness: FreshnessPolicy,
    /// Skipped-key limits of new sessions (profile defaults).
    pub session: SessionConfig,
    /// How often the signed prekey is replaced (default 7 days).
    pub signed_prekey_rotation: u64,
    /// How long a replaced signed prekey's private half is kept so late
    /// prekey messages still decrypt (default 35 days: longer than the
    /// relay's 30-day retention).
    pub signed_prekey_grace: u64,
    /// How many one-time prekeys the directory should hold (default 100).
    pub one_time_prekeys: u32,
    /// Refill when the directory holds fewer than this (default 25).
    pub refill_below: u32,
    /// Envelopes fetched and committed per batch (default 500).
    pub receive_batch: u32,
    /// Deposit attempts before a message is left in the outbox (default 3).
    pub deposit_attempts: u32,
    /// How long "processed" marks (of envelopes and of message ids shown)
    /// are kept (default 60 days, twice the relay's retention and longer
    /// than [`ClientConfig::give_up_after`]).
    pub processed_retention: u64,
    /// The longest body [`Client::send`] accepts (default 256 KiB minus 256
    /// bytes, so that the envelope fits the relay's default 256 KiB).
    pub max_body: usize,
    /// Fetch rounds one [`Client::receive`] makes at most per mailbox it
    /// fetches (default 100; with v2 a receive fetches up to three): a
    /// relay that keeps serving envelopes cannot hold the client forever.
    pub max_receive_rounds: u32,
    /// Archived sessions kept per peer device beside the current one
    /// (default 40).
    pub archived_sessions: usize,
    /// How long a message waits for its receipt before it is re-sent
    /// (default 1 hour); each further re-send waits twice as long as the
    /// one before, up to [`ClientConfig::resend_max_interval`].
    pub resend_after: u64,
    /// The longest wait between two re-sends (default 1 day).
    pub resend_max_interval: u64,
    /// How long after it was handed over a message without a receipt is
    /// given up and reported failed (default 30 days).
    pub give_up_after: u64,
    /// At most one dead-session notice per peer device in this many seconds
    /// (default 1 hour): what a forged prekey message can cost.
    pub notice_interval: u64,
    /// A session is presumed dead, without waiting for the re-send time,
    /// once this many messages were handed over for the peer since the
    /// session started, none of them answered, and nothing has arrived from
    /// the peer since the first of them (default 50; times in seconds).
    pub dead_after_messages: u32,
    /// How long [`Client::account_inbox`] holds an account message back
    /// while an earlier message of the same sender device to this device
    /// (the one its header names as `previous`) has not arrived, counted
    /// from when it was received (default 2 days: twice
    /// [`ClientConfig::resend_max_interval`], so that a sender that is
    /// online re-sends a lost message before its successors are shown
    /// without it). After that the message is shown with
    /// [`AccountMessage::gap_before`](accounts::AccountMessage::gap_before)
    /// set: a lost or given-up message never blocks its successors for
    /// longer.
    pub hold_back: u64,
    /// The most leading zero bits the client grinds for one stamp (SPEC.md
    /// 16.6, 16.7; a deposit stamp needs the relay's difficulty plus
    /// `ceil(log2(4 KiB blocks))`). A relay that asks more is not obeyed:
    /// the deposit stays queued, the upload fails. Default 30 (about 2^30
    /// SHA-256, minutes of one core; the default relay asks 20 to 26 for a
    /// deposit, 24 for a new identity).
    pub max_stamp_bits: u32,
    /// Whether new sessions use profile v2 (SPEC.md section 26): sealed
    /// prekey messages, encrypted headers, routing tags as envelope ids and
    /// padded payloads, so that a relay learns no sender and cannot link
    /// one conversation's envelopes. Default `true`. Existing sessions keep
    /// the profile they were created with, and the client receives both.
    pub sealed: bool,
}

const DAY: u64 = 24 * 60 * 60;

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            device_id: 1,
            freshness: FreshnessPolicy::default(),
            session: SessionConfig::default(),
            signed_prekey_rotation: 7 * DAY,
            signed_prekey_grace: 35 * DAY,
            one_time_prekeys: 100,
            refill_below: 25,
            receive_batch: 500,
            deposit_attempts: 3,
            processed_retention: 60 * DAY,
            max_body: 256 * 1024 - 256,
            max_receive_rounds: 100,
            archived_sessions: DEFAULT_ARCHIVED_SESSIONS,
            resend_after: 60 * 60,
            resend_max_interval: DAY,
            give_up_after: 30 * DAY,
            notice_interval: 60 * 60,
            dead_after_messages: 50,
            hold_back: 2 * DAY,
            max_stamp_bits: 30,
            sealed: true,
        }
    }
}

/// What can go wrong in the client.
#[derive(Debug)]
#[non_exhaustive]
pub enum ClientError {
    /// The protocol refused something (a forged or stale bundle, ...).
    Protocol(Error),
    /// The local store failed.
    Store(StoreError),
    /// The directory or mailbox refused or failed.
    Transport(TransportError),
    /// The directory served a bundle whose identity key is not the one
    /// asked for (a substituted bundle).
    WrongIdentity,
    /// The peer's identity key is marked compromised.
    Compromised,
    /// The body is too long for one message.
    TooLong,
    /// A device list was refused (SPEC.md 25.6), or a stored one does not
    /// load.
    DeviceList(Box<crate::protocol::devices::DeviceListError>),
    /// This device has no account yet ([`Client::create_account`]), or the
    /// contact's account was never fetched ([`Client::refresh_account`]).
    NoAccount,
    /// Pairing payload bytes that do not decode (SPEC.md 25.9).
    Payload(pairing::PayloadError),
    /// This device has an account already: it cannot offer to be paired.
    AlreadyPaired,
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Protocol(_) => f.write_str("the protocol refused"),
            ClientError::Store(_) => f.write_str("the local store failed"),
            ClientError::Transport(_) => f.write_str("the directory or mailbox failed"),
            ClientError::WrongIdentity => {
                f.write_str("the directory served a bundle of another identity")
            }
            ClientError::Compromised => f.write_str("the peer is marked compromised"),
            ClientError::TooLong => f.write_str("message body too long"),
            ClientError::DeviceList(_) => f.write_str("a device list was refused"),
            ClientError::NoAccount => f.write_str("no such account"),
            ClientError::Payload(_) => f.write_str("malformed pairing payload"),
            ClientError::AlreadyPaired => f.write_str("this device has an account already"),
        }
    }
}

/// The underlying error is the [`source`](std::error::Error::source) (and
/// is not repeated in the `Display` text, so that a reporter printing the
/// chain shows each once): `protocol`, `store` or `transport` failures
/// carry it; the others have none.
impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::Protocol(e) => Some(e),
            ClientError::Store(e) => Some(e),
            ClientError::Transport(e) => Some(e),
            ClientError::DeviceList(e) => Some(&**e),
            ClientError::Payload(e) => Some(e),
            ClientError::WrongIdentity
            | ClientError::Compromised
            | ClientError::TooLong
            | ClientError::NoAccount
            | ClientError::AlreadyPaired => None,
        }
    }
}

impl From<Error> for ClientError {
    fn from(e: Error) -> Self {
        ClientError::Protocol(e)
    }
}
impl From<StoreError> for ClientError {
    fn from(e: StoreError) -> Self {
        ClientError::Store(e)
    }
}
impl From<TransportError> for ClientError {
    fn from(e: TransportError) -> Self {
        ClientError::Transport(e)
    }
}

/// The outcome of [`Client::send`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sent {
    /// The envelope id.
    pub id: EnvelopeId,
    /// The message id: [`Client::delivery`] tells where it is.
    pub message: MessageId,
    /// Whether the deposit succeeded; if not, the envelope waits in the
    /// outbox for [`Client::flush_outbox`].
    pub deposited: bool,
}

/// What one [`Client::receive`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReceiveReport {
    /// Messages decrypted and committed to the inbox.
    pub received: usize,
    /// Envelopes already processed before (redelivered), acknowledged again.
    pub redelivered: usize,
    /// Messages re-sent by their sender that were already shown: not shown
    /// again, acknowledged again end to end.
    pub duplicates: usize,
    /// Envelopes rejected (undecryptable, replayed, forged, from a
    /// compromised peer), with the reason; they are acknowledged (they can
    /// never decrypt) and dropped.
    pub rejected: Vec<(EnvelopeId, Rejection)>,
    /// Gaps: per peer device heard from in this receive, how many messages
    /// the ratchet counters show were sent but have not arrived (dropped or
    /// withheld by the relay), sorted by address. [`Client::missing`] lists
    /// them for every peer (it opens every record).
    pub missing: Vec<(DeviceAddress, usize)>,
    /// Our messages whose receipt arrived in this call.
    pub delivered: Vec<MessageId>,
    /// Peer devices whose stored sessions did not load and were
    /// quarantined ([`Store::quarantined`]); new sessions replace them.
    pub quarantined: Vec<DeviceAddress>,
    /// Peer devices told that we could not open their prekey message
    /// (a dead-session notice, in a new session).
    pub notices: Vec<DeviceAddress>,
    /// What the re-send step after the batch did.
    pub resend: ResendReport,
}

/// What one [`Client::resend`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResendReport {
    /// Messages encrypted and queued again.
    pub resent: usize,
    /// New sessions started because the old one looked dead or was lost.
    pub new_sessions: usize,
    /// Messages given up, with the reason.
    pub failed: Vec<(MessageId, Failure)>,
    /// Peers that could not be reached this time (bundle or deposit
    /// failed): tried again by the next call.
    pub unreachable: Vec<DeviceAddress>,
    /// Stored rows that did not load (corrupted), as the store names
    /// them: the messages they concern wait until the rows are repaired.
    pub problems: Vec<String>,
}

/// Why an envelope was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// The protocol refused it (duplicate, forgery, ...).
    Protocol(Error),
    /// A prekey message that could not start a session (our prekeys were
    /// lost or it is forged): names the identity key it claims, to which a
    /// dead-session notice goes if the key belongs to a known peer.
    Prekey {
        /// IK_A, as the message claims it (not authenticated).
        identity: [u8; 32],
        /// Why it failed.
        error: Error,
    },
    /// No session could take it.
    NoSession,
    /// Its plaintext is not a valid client frame.
    BadFrame,
    /// The sender is marked compromised.
    Compromised,
    /// The sender's trust cannot be read (its peer record does not load):
    /// refused until [`Client::set_trust`] rewrites the record.
    Unverified,
}

/// What [`Client::save_contact`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContactUpdate {
    /// A contact not known before.
    New,
    /// This address was already the contact's.
    Unchanged,
    /// A device number not known before for the contact.
    NewDevice,
    /// The contact's device has a new identity key: the safety number
    /// changed. The new key has its own trust (unvalidated unless it was
    /// validated itself): compare safety numbers again.
    KeyChanged {
        /// The device number.
        device_id: u32,
        /// The key it had.
        previous: [u8; 32],
        /// The trust the previous key had (`Validated`: tell the user the
        /// verified contact changed).
        previous_trust: Option<Trust>,
    },
}

/// A device: its store and its view of the untrusted directory and mailbox.
pub struct Client<S, D, M> {
    store: S,
    directory: D,
    mailbox: M,
    config: ClientConfig,
    identity: LocalIdentity,
    /// When the last dead-session notice went to each peer (in memory: a
    /// restart allows one more).
    notices: HashMap<DeviceAddress, u64>,
    /// The highest deposit stamp difficulty a relay asked of this client
    /// (in memory): a deposit without an access key mints a stamp at it
    /// before its first try.
    stamp_difficulty: AtomicU8,
    /// The latest time the client was given (in memory): the time of the
    /// stamps [`Client::flush_outbox`] mints.
    last_now: AtomicU64,
    /// The access-key epoch whose private inbox this process published
    /// (0: none yet).
    inbox_published: AtomicU32,
}

/// Nonces tried between two yields to the executor while minting a stamp.
const STAMP_SLICE: u64 = 1 << 16;

/// Completes when the first of two futures does (its output dropped; the
/// other future is dropped unfinished). Runtime-agnostic: both are polled
/// with the caller's waker.
struct FirstOf<A, B>(core::pin::Pin<Box<A>>, core::pin::Pin<Box<B>>);

impl<A: core::future::Future, B: core::future::Future> core::future::Future for FirstOf<A, B> {
    type Output = ();
    fn poll(
        mut self: core::pin::Pin<&mut Self>,
        cx: &mut core::task::Context<'_>,
    ) -> core::task::Poll<()> {
        if self.0.as_mut().poll(cx).is_ready() || self.1.as_mut().poll(cx).is_ready() {
            core::task::Poll::Ready(())
        } else {
            core::task::Poll::Pending
        }
    }
}

/// A future that is pending once (waking its task at once), then ready:
/// lets other tasks of a single-threaded executor (a browser's) run
/// between two slices of stamp minting. Runtime-agnostic.
struct YieldNow(bool);

impl core::future::Future for YieldNow {
    type Output = ();
    fn poll(
        mut self: core::pin::Pin<&mut Self>,
        cx: &mut core::task::Context<'_>,
    ) -> core::task::Poll<()> {
        if self.0 {
            core::task::Poll::Ready(())
        } else {
            self.0 = true;
            cx.waker().wake_by_ref();
            core::task::Poll::Pending
        }
    }
}

/// The first nonce of a stamp minted without the caller's randomness
/// ([`Client::flush_outbox`]): from the envelope id, which the client drew
/// from its rng (a stamp is bound to its envelope id, so no one else mints
/// for it).
fn start_of(id: &EnvelopeId) -> u64 {
    let mut start = [0u8; 8];
    start.copy_from_slice(&id.0[..8]);
    u64::from_be_bytes(start)
}

impl<S, D, M> fmt::Debug for Client<S, D, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field(
                "address",
                &DeviceAddress::new(self.identity.keys.public(), self.identity.device_id),
            )
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The working state of one received batch: copies of the records and
/// prekeys, and everything to commit with the batch.
#[derive(Default)]
struct Batch {
    records: HashMap<DeviceAddress, SessionRecord>,
    touched: Vec<DeviceAddress>,
    prekeys: Option<PrekeyState>,
    prekeys_changed: bool,
    peers: PeerCache,
    /// Peer devices already looked up in this batch.
    known: HashSet<DeviceAddress>,
    new_peers: Vec<PeerRecord>,
    /// Envelopes processed, each with the index of its inbox message.
    processed: Vec<(EnvelopeId, Option<usize>)>,
    messages: Vec<InboxMessage>,
    /// Marks of the message ids shown (see [`seen_mark`]).
    seen: HashSet<EnvelopeId>,
    sent: Vec<SentMessage>,
    receipts: Vec<(DeviceAddress, Vec<[u8; 16]>)>,
    urgent: HashSet<DeviceAddress>,
    unaccepted: Vec<([u8; 32], [u8; 16])>,
    /// A store failure met while routing (aborts the batch).
    failed: Option<StoreError>,
    /// The records awaiting a new ratchet key not loaded yet, least
    /// recently written first (`None`: not asked yet).
    awaiting: Option<Vec<DeviceAddress>>,
    /// The record `route` found to open the next message's new chain
    /// (tried first).
    new_chain_owner: Option<DeviceAddress>,
    /// Per peer device heard from, the highest access-key epoch known
    /// (stored or received in this batch).
    access_epochs: HashMap<DeviceAddress, Option<(u32, bool)>>,
    /// Peer devices' new access keys, to commit with the batch.
    access: HashMap<DeviceAddress, AccessKeyRecord>,
}

impl Batch {
    fn touch(&mut self, address: DeviceAddress) {
        if !self.touched.contains(&address) {
            self.touched.push(address);
        }
    }
    fn receipt(&mut self, to: DeviceAddress, id: [u8; 16]) {
        match self.receipts.iter_mut().find(|(a, _)| *a == to) {
            Some((_, ids)) => ids.push(id),
            None => self.receipts.push((to, vec![id])),
        }
    }
}

/// What the batches of one receive leave to answer once they are all
/// committed and acknowledged.
#[derive(Default)]
struct Answers {
    receipts: Vec<(DeviceAddress, Vec<[u8; 16]>)>,
    urgent: HashSet<DeviceAddress>,
    unaccepted: Vec<([u8; 32], [u8; 16])>,
}

impl Answers {
    fn take(&mut self, batch: Batch) {
        for (peer, ids) in batch.receipts {
            match self.receipts.iter_mut().find(|(a, _)| *a == peer) {
                Some((_, all)) => all.extend(ids),
                None => self.receipts.push((peer, ids)),
            }
        }
        self.urgent.extend(batch.urgent);
        self.unaccepted.extend(batch.unaccepted);
    }
}

/// What a deposit attempt came to, before the store records it.
enum Deposit {
    /// The relay has the envelope: it leaves the outbox.
    Done,
    /// Never deliverable (too large, malformed): it leaves the outbox and
    /// the error says why.
    Dropped(TransportError),
    /// Refused for now, or the relay unreachable: it stays queued.
    Later,
}

/// How many deposits [`Client::flush_outbox`] records per store
/// transaction: one transaction for a usual outbox, and a bound on what a
/// crash makes it deposit again.
const FLUSH_BATCH: usize = 256;

/// The state a message moves to once an envelope of it is deposited.
fn deposited_state(message: &SentMessage) -> DeliveryState {
    if message.sends > 1 {
        DeliveryState::Resent
    } else {
        DeliveryState::Deposited
    }
}

/// The "processed" mark of a message id shown from `from`: kept in the
/// same set as envelope ids, under a derived name,
/// `SHA-256("cubbyhole/v1 seen" || identity || device_id || message id)`
/// truncated to 16 bytes.
fn seen_mark(from: &DeviceAddress, id: &[u8; 16]) -> EnvelopeId {
    EnvelopeId(labelled_digest16(
        b"cubbyhole/v1 seen",
        &[&from.identity, &from.device_id.to_be_bytes(), id],
    ))
}

/// The strongest statement about an identity key among its peer records:
/// compromised if any says so, else validated if any does.
fn fold_trust(records: &[PeerRecord]) -> Option<Trust> {
    records.iter().map(|p| p.trust).max_by_key(|t| match t {
        Trust::Unvalidated => 0,
        Trust::Validated => 1,
        Trust::Compromised => 2,
    })
}

/// Peers' trust by identity key, read once per batch.
type PeerCache = HashMap<[u8; 32], Option<Trust>>;

impl<S: Store, D: PrekeyDirectory, M: Mailbox> Client<S, D, M> {
    /// Opens the device stored in `store`, creating its identity (and
    /// prekeys, published by [`Client::maintain_prekeys`]) if it has none.
    ///
    /// # Errors
    /// [`ClientError::Store`].
    ///
    /// # Cancel safety
    /// Safe; a dropped call may have stored a new identity (the
    /// next call opens it).
    pub async fn open(
        mut store: S,
        directory: D,
        mailbox: M,
        config: ClientConfig,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Self, ClientError> {
        let identity = match store.identity().await? {
            Some(identity) => identity,
            None => {
                let identity = LocalIdentity {
                    keys: IdentityKeyPair::generate(rng),
                    device_id: config.device_id,
                };
                store.set_identity(&identity).await?;
                identity
            }
        };
        Ok(Client {
            store,
            directory,
            mailbox,
            config,
            identity,
            notices: HashMap::new(),
            stamp_difficulty: AtomicU8::new(0),
            inbox_published: AtomicU32::new(0),
            last_now: AtomicU64::new(0),
        })
    }

    /// This device's address (what peers send to).
    pub fn address(&self) -> DeviceAddress {
        DeviceAddress::new(self.identity.keys.public(), self.identity.device_id)
    }

    /// This device's identity key.
    pub fn identity(&self) -> &IdentityKey {
        self.identity.keys.public()
    }

    /// The client's settings.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// The safety number to compare with a peer out of band.
    ///
    /// # Errors
    /// [`ClientError::Protocol`] if the address holds an invalid key.
    pub fn safety_number(&self, peer: &DeviceAddress) -> Result<SafetyNumber, ClientError> {
        let theirs = IdentityKey::from_bytes(&peer.identity)?;
        Ok(SafetyNumber::new(self.identity.keys.public(), &theirs))
    }

    /// Records the result of comparing safety numbers (or a compromise).
    /// Trust belongs to the identity key: every known device with the
    /// peer's key gets it, and a device number seen later inherits it (a
    /// key marked compromised is refused under every device number).
    ///
    /// # Errors
    /// [`ClientError::Store`].
    ///
    /// # Cancel safety
    /// Safe; each peer record is written on its own, so a
    /// dropped call may have marked some of the key's devices and not others:
    /// call it again.
    pub async fn set_trust(
        &mut self,
        peer: &DeviceAddress,
        trust: Trust,
        now: u64,
    ) -> Result<(), ClientError> {
        check_timestamp(now)?;
        // A record of the key that does not load is rewritten (from the
        // given address) rather than blocking the change.
        let mut records = match self.store.peers_with_identity(&peer.identity).await {
            Ok(records) => records,
            Err(StoreError::Corrupted { .. }) => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        if !records.iter().any(|p| p.address == *peer) {
            records.push(PeerRecord {
                address: *peer,
                trust,
                first_seen: now,
            });
        }
        for mut record in records {
            record.trust = trust;
            self.store.set_peer(&record).await?;
        }
        if trust == Trust::Compromised {
            // Nothing more goes to a compromised key.
            for mut m in self.store.pending_sent().await? {
                if m.to.identity == peer.identity {
                    m.state = DeliveryState::Failed(Failure::Compromised);
                    m.body.clear();
                    self.store.update_sent(&m).await?;
                }
            }
        }
        Ok(())
    }

    /// Records that `address` is a device of the contact the application
    /// calls `name` (its own name for a person: a user name, a row id), as
    /// the application learns it (from its own directory, before sending,
    /// or when the user links a conversation to a person). The client
    /// compares it with the address it had for the same device number:
    /// a different identity key is a [`ContactUpdate::KeyChanged`], the
    /// key change of a known contact (Signal's "safety number changed"),
    /// never a silent switch. Trust stays with each key: the new key does
    /// not inherit the old one's `Validated`. The contact's earlier keys
    /// are kept (the last [`ContactRecord::MAX_PREVIOUS`]).
    ///
    /// # Errors
    /// [`ClientError::TooLong`] for a name over
    /// [`ContactRecord::MAX_NAME`] bytes; [`ClientError::Store`].
    ///
    /// # Cancel safety
    /// Safe; the contact is written in one call: dropped, it is
    /// either saved or not (call it again).
    pub async fn save_contact(
        &mut self,
        name: &[u8],
        address: &DeviceAddress,
        now: u64,
    ) -> Result<ContactUpdate, ClientError> {
        check_timestamp(now)?;
        if name.len() > ContactRecord::MAX_NAME {
            return Err(ClientError::TooLong);
        }
        let mut contact = self.store.contact(name).await?.unwrap_or(ContactRecord {
            name: name.to_vec(),
            devices: Vec::new(),
            previous: Vec::new(),
            changed_at: 0,
        });
        let is_new = contact.devices.is_empty();
        let update = match contact
            .devices
            .iter_mut()
            .find(|d| d.device_id == address.device_id)
        {
            Some(d) if d.identity == address.identity => ContactUpdate::Unchanged,
            Some(d) => {
                let previous = d.identity;
                d.identity = address.identity;
                contact.previous.retain(|k| k != &previous);
                contact.previous.push(previous);
                let excess = contact
                    .previous
                    .len()
                    .saturating_sub(ContactRecord::MAX_PREVIOUS);
                contact.previous.drain(..excess);
                contact.changed_at = now;
                ContactUpdate::KeyChanged {
                    device_id: address.device_id,
                    previous,
                    previous_trust: fold_trust(&self.store.peers_with_identity(&previous).await?),
                }
            }
            None if is_new => ContactUpdate::New,
            None => ContactUpdate::NewDevice,
        };
        if matches!(update, ContactUpdate::New | ContactUpdate::NewDevice) {
            if contact.devices.len() >= ContactRecord::MAX_DEVICES {
                return Err(ClientError::TooLong);
            }
            contact.devices.push(*address);
            contact.devices.sort_by_key(|d| d.device_id);
        }
        if update != ContactUpdate::Unchanged {
            self.store.set_contact(&contact).await?;
        }
        if self.store.peer(address).await?.is_none() {
            let trust = fold_trust(&self.store.peers_with_identity(&address.identity).await?);
            self.store
                .set_peer(&PeerRecord {
                    address: *address,
                    trust: trust.unwrap_or(Trust::Unvalidated),
                    first_seen: now,
                })
                .await?;
        }
        Ok(update)
    }

    /// A contact by the application's name for it.
    ///
    /// # Errors
    /// [`ClientError::Store`].
    ///
    /// # Cancel safety
    /// Safe (a read).
    pub async fn contact(&self, name: &[u8]) -> Result<Option<ContactRecord>, ClientError> {
        Ok(self.store.contact(name).await?)
    }

    /// The trust of an identity key (`None`: never seen).
    ///
    /// # Errors
    /// [`ClientError::Store`].
    ///
    /// # Cancel safety
    /// Safe (a read).
    pub async fn trust(&self, identity: &[u8; 32]) -> Result<Option<Trust>, ClientError> {
        Ok(fold_trust(&self.store.peers_with_identity(identity).await?))
    }

    /// The local store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The local store, mutably (for tests and tools: changing records
    /// behind the client's back voids its guarantees).
    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    /// Consumes the client, returning its store (to close it).
    pub fn into_store(self) -> S {
        self.store
    }

    /// Where a message handed to [`Client::send`] is (`None`: unknown, or
    /// delivered or failed long enough ago to be pruned).
    ///
    /// # Errors
    /// [`ClientError::Store`].
    ///
    /// # Cancel safety
    /// Safe (a read).
    pub async fn delivery(&self, id: &MessageId) -> Result<Option<DeliveryState>, ClientError> {
        Ok(self.store.sent_message(id).await?.map(|m| m.state))
    }

    /// Tells the client that its store was just restored from a backup (or
    /// copied from another device): it may hold sessions that already
    /// encrypted past the copy, and encrypting under them again would
    /// repeat message keys. Every session is superseded (none encrypts
    /// again; new sessions, marked `RESET`, replace them at the next send
    /// or [`Client::resend`]), every unacknowledged message is due for
    /// re-sending, and the prekeys are replaced at once (the replay digests
    /// of the sessions accepted after the copy are gone with it: the old
    /// signed and one-time prekeys must not accept anything again). Call it
    /// before any other method after a restore; SPEC.md, "Restoring a
    /// backup", says why it cannot be detected from the store alone.
    ///
    /// # Errors
    /// [`ClientError::Store`]; [`ClientError::Transport`] if the new
    /// prekeys cannot be published (the next
    /// [`Client::maintain_prekeys`] retries).
    ///
    /// # Cancel safety
    /// Safe; what was done is stored, and calling it again
    /// finishes the rest.
    pub async fn restored_from_backup(
        &mut self,
        rng: &mut (impl CryptoRngCore + MaybeSend),
        now: u64,
    ) -> Result<(), ClientError> {
        check_timestamp(now)?;
        for (peer, record) in self.store.sessions().await? {
            match record {
                Ok(mut record) => {
                    record.supersede_all();
                    self.store.set_session(&peer, &record).await?;
                }
                Err(e) => self.quarantine(&peer, now, &e).await?,
            }
        }
        for mut m in self.store.pending_sent().await? {
            m.last_sent = 0;
            self.store.update_sent(&m).await?;
        }
        if let Some(mut state) = self.store.prekeys().await? {
            let keys = &self.identity.keys;
            state.prekeys.rotate_signed_prekey(rng, keys, now)?;
            let current = state.prekeys.current_signed_prekey().id();
            let old: Vec<u32> = state
                .prekeys
                .signed_prekeys()
                .map(|k| k.id())
                .filter(|id| *id != current)
                .collect();
            for id in old {
                state.prekeys.remove_retired_signed_prekey(id);
            }
            let next = state.prekeys.next_one_time_prekey_id();
            state.prekeys.remove_one_time_prekeys_below(next);
            state.retired_at.clear();
            state.one_time_retired.clear();
            state.accepted.clear();
            state.last_rotation = now;
            state.upload_pending = true;
            self.store.set_prekeys(&state).await?;
            self.maintain_prekeys(rng, now).await?;
        }
        // Tell every peer now (RESET sessions), and re-send.
        self.resend(rng, now).await?;
        Ok(())
    }

    async fn quarantine(
        &mut self,
        peer: &DeviceAddress,
        now: u64,
        why: &StoreError,
    ) -> Result<(), ClientError> {
        self.store
            .quarantine_session(peer, now, &why.to_string())
            .await?;
        // An empty record remembers that sessions with this peer were lost:
        // the next one we start carries RESET.
        self.store.set_session(peer, &SessionRecord::new()).await?;
        Ok(())
    }

    /// The stored record of a peer, quarantining it if it does not load.
    async fn load_record(
        &mut self,
        peer: &DeviceAddress,
        now: u64,
    ) -> Result<Option<SessionRecord>, ClientError> {
        match self.store.session(peer).await {
            Ok(record) => Ok(record),
            Err(e @ StoreError::Corrupted { .. }) => {
                self.quarantine(peer, now, &e).await?;
                Ok(Some(SessionRecord::new()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Runs the prekey lifecycle at time `now` and uploads what changed;
    /// returns whether an upload was made. Call it at start-up and then
    /// periodically (say hourly):
    ///
    /// - on first use, creates the signed prekey and a pool of one-time
    ///   prekeys;
    /// - when the signed prekey is older than the rotation period, replaces
    ///   it (keeping the old private half for the grace period) and replaces
    ///   the directory's one-time-prekey pool with a fresh one;
    /// - when the directory holds fewer one-time prekeys than the threshold,
    ///   adds new ones;
    /// - forgets retired signed prekeys, and one-time prekeys withdrawn from
    ///   the directory, once their grace period is over (so local keys stay
    ///   bounded: a withdrawn key can only be named by a prekey message sent
    ///   before the withdrawal, which the relay keeps no longer than its
    ///   retention, shorter than the grace period);
    /// - if an earlier upload failed, or the directory lost the device,
    ///   replaces the pool again (fresh keys, so none is handed out twice).
    ///
    /// The state, with an upload counter above the last one, is committed
    /// before each upload and marked done after it.
    ///
    /// # Errors
    /// [`ClientError::Store`], [`ClientError::Transport`]; a failed upload
    /// is retried by the next call.
    ///
    /// # Cancel safety
    /// Safe; an upload committed locally but not confirmed is
    /// redone by the next call (the prekey state remembers it).
    pub async fn maintain_prekeys(
        &mut self,
        rng: &mut (impl CryptoRngCore + MaybeSend),
        now: u64,
    ) -> Result<bool, ClientError> {
        check_timestamp(now)?;
        let me = self.address();
        let keys = &self.identity.keys;
        let mut state = match self.store.prekeys().await? {
            Some(state) => state,
            None => PrekeyState {
                prekeys: PrekeyStore::new(rng, keys, now)?,
                upload_counter: 0,
                last_rotation: now,
                retired_at: Vec::new(),
                one_time_retired: Vec::new(),
                upload_pending: true,
                accepted: Vec::new(),
            },
        };
        self.saw_time(now);
        // A device without an access key (new, or a store from before
        // access keys) draws one; the upload that registers its verifier
        // is marked pending first, so a crash before the upload still
        // leads to one.
        let own = match self.store.own_access_key().await {
            Ok(own) => own,
            // Unreadable: a new key replaces it.
            Err(StoreError::Corrupted { .. }) => None,
            Err(e) => return Err(e.into()),
        };
        let access = match own {
            Some(access) => access,
            None => {
                if !state.upload_pending {
                    state.upload_pending = true;
                    self.store.set_prekeys(&state).await?;
                }
                let access = AccessKeyRecord {
                    epoch: 1,
                    key: AccessKey::generate(rng),
                    inbox: None,
                };
                self.store.set_own_access_key(&access).await?;
                access
            }
        };
        let mut changed = false;
        let mut replace = state.upload_pending;
        if now.saturating_sub(state.last_rotation) >= self.config.signed_prekey_rotation {
            let old = state.prekeys.current_signed_prekey().id();
            state.prekeys.rotate_signed_prekey(rng, keys, now)?;
            state.retired_at.push((old, now));
            state.last_rotation = now;
            replace = true;
        }
        // Forget what is past its grace period.
        let grace = self.config.signed_prekey_grace;
        let expired = |at: &u64| now.saturating_sub(*at) > grace;
        for (id, _) in state.retired_at.iter().filter(|(_, at)| expired(at)) {
            state.prekeys.remove_retired_signed_prekey(*id);
            changed = true;
        }
        state.retired_at.retain(|(_, at)| !expired(at));
        // Replay digests go with their signed prekey: once it is gone, its
        // prekey messages fail as `unknown_prekey` anyway.
        let held: Vec<u32> = state.prekeys.signed_prekeys().map(|k| k.id()).collect();
        let before = state.accepted.len();
        state.accepted.retain(|(id, _)| held.contains(id));
        changed |= state.accepted.len() != before;
        for (below, _) in state.one_time_retired.iter().filter(|(_, at)| expired(at)) {
            changed |= state.prekeys.remove_one_time_prekeys_below(*below) > 0;
        }
        state.one_time_retired.retain(|(_, at)| !expired(at));

        let mut add = 0;
        if !replace {
            match self.directory.one_time_prekeys_left(&me).await {
                Ok(left) if left < self.config.refill_below => {
                    add = self.config.one_time_prekeys.saturating_sub(left);
                }
                Ok(_) => {}
                Err(TransportError::NotFound) => replace = true,
                Err(e) => return Err(e.into()),
            }
        }
        let first_new = state.prekeys.next_one_time_prekey_id();
        if replace {
            // Withdraw the whole pool: keys already handed out stay held for
            // the grace period; none is published again.
            state.one_time_retired.push((first_new, now));
            add = self.config.one_time_prekeys;
        }
        if !replace && add == 0 {
            if changed {
                self.store.set_prekeys(&state).await?;
            }
            return Ok(false);
        }
        state.prekeys.generate_one_time_prekeys(rng, add);
        // Committed before the upload: the counter is never reused, and a
        // failed upload is redone (with fresh keys) by the next call.
        state.upload_counter = state.upload_counter.max(now).saturating_add(1);
        state.upload_pending = true;
        self.store.set_prekeys(&state).await?;
        let one_time: Vec<_> = state
            .prekeys
            .one_time_prekeys()
            .filter(|k| k.id() >= first_new)
            .collect();
        let mut upload = BundleSetUpload::new(
            self.identity.device_id,
            keys,
            state.upload_counter,
            state.prekeys.current_signed_prekey(),
            &one_time,
            replace,
        );
        upload.access_verifier = Some(access.key.verifier(&me.mailbox()));
        self.publish_upload(&self.identity.keys, upload, rng, now)
            .await?;
        state.upload_pending = false;
        self.store.set_prekeys(&state).await?;
        Ok(true)
    }

    /// Signs and publishes an upload; if the relay asks for an identity
    /// stamp (a first upload, SPEC.md 16.11), mints one at the difficulty
    /// it names (in slices, yielding between them) and publishes again,
    /// once.
    async fn publish_upload(
        &self,
        keys: &IdentityKeyPair,
        mut upload: BundleSetUpload,
        rng: &mut (impl CryptoRngCore + MaybeSend),
        now: u64,
    ) -> Result<(), ClientError> {
        match self.directory.publish(&upload.sign(keys)).await {
            Err(TransportError::StampRequired(difficulty)) => {
                let device = upload.device;
                let stamp = self
                    .mint(rng.next_u64(), u32::from(difficulty), |start, budget| {
                        Stamp::mint_identity(&device, difficulty, now, start, budget)
                    })
                    .await
                    .ok_or(TransportError::StampRequired(difficulty))?;
                upload.identity_stamp = Some(stamp);
                Ok(self.directory.publish(&upload.sign(keys)).await?)
            }
            other => Ok(other?),
        }
    }

    /// Grinds a stamp needing `bits` leading zero bits with `step(start,
    /// budget)` ([`Stamp::mint`] or [`Stamp::mint_identity`]), from nonce
    /// `start`, [`STAMP_SLICE`] nonces at a time, yielding to the executor
    /// between slices. `None` if `bits` is above
    /// [`ClientConfig::max_stamp_bits`], or nothing was found in 2^(bits +
    /// 8) tries (a chance of e^-256).
    async fn mint(
        &self,
        start: u64,
        bits: u32,
        mut step: impl FnMut(
            u64,
            u64,
        ) -> Result<
            Result<Stamp, crate::transport::stamp::Unfinished>,
            crate::transport::stamp::StampError,
        >,
    ) -> Option<Stamp> {
        if bits > self.config.max_stamp_bits {
            return None;
        }
        let limit = 1u64 << (bits + 8).min(63);
        let mut next = start;
        let mut tried = 0u64;
        while tried < limit {
            match step(next, STAMP_SLICE) {
                Ok(Ok(stamp)) => return Some(stamp),
                Ok(Err(unfinished)) => next = unfinished.next_nonce,
                Err(_) => return None,
            }
            tried += STAMP_SLICE;
            YieldNow(false).await;
        }
        None
    }

    /// A deposit stamp for `envelope` to `mailbox` at `difficulty`, time
    /// `now`, from nonce `start` (see [`Client::mint`]).
    async fn mint_deposit(
        &self,
        mailbox: &MailboxId,
        envelope: &Envelope,
        difficulty: u8,
        now: u64,
        start: u64,
    ) -> Option<Stamp> {
        let len = u32::try_from(envelope.payload.len()).ok()?;
        let bits = required_bits(difficulty, len);
        self.mint(start, bits, |start, budget| {
            Stamp::mint(mailbox, &envelope.id, len, difficulty, now, start, budget)
        })
        .await
    }

    /// Remembers the latest time the client was given.
    fn saw_time(&self, now: u64) {
        self.last_now.fetch_max(now, Ordering::Relaxed);
    }

    /// This device's current deposit access key and its epoch (`None`
    /// until the first [`Client::maintain_prekeys`] draws one).
    ///
    /// # Errors
    /// [`ClientError::Store`].
    ///
    /// # Cancel safety
    /// Safe (a read).
    pub async fn access_key(&self) -> Result<Option<AccessKeyRecord>, ClientError> {
        Ok(self.store.own_access_key().await?)
    }

    /// Replaces this device's deposit access key (SPEC.md, "Access keys in
    /// the client"): draws a new key with the epoch + 1 and registers its
    /// verifier with the relay in one upload. The relay still takes the
    /// previous key for its grace period (`RelayConfig::access_grace`, a
    /// day by default); contacts get the new key in the next frame this
    /// device sends them (unless excluded: [`Client::exclude_contact`]).
    /// Returns the new epoch. A device that never published publishes
    /// first ([`Client::maintain_prekeys`]).
    ///
    /// ```
    /// # use cubbyhole::client::{block_on, Client, ClientConfig};
    /// # use cubbyhole::relay::{InProcessRelay, MemoryRelayStorage, Relay, RelayConfig};
    /// # use cubbyhole::storage::MemoryStore;
    /// # use rand_core::OsRng;
    /// # let relay = InProcessRelay::new(Relay::new(MemoryRelayStorage::new(), RelayConfig::unpriced()));
    /// # let now = relay.now();
    /// let mut device = block_on(Client::open(
    ///     MemoryStore::new(), relay.clone(), relay.clone(), ClientConfig::default(), &mut OsRng,
    /// )).unwrap();
    /// block_on(device.maintain_prekeys(&mut OsRng, now)).unwrap();
    /// let first = block_on(device.access_key()).unwrap().unwrap();
    /// assert_eq!(first.epoch, 1);
    /// assert_eq!(block_on(device.rotate_access_key(&mut OsRng, now)).unwrap(), 2);
    /// let second = block_on(device.access_key()).unwrap().unwrap();
    /// assert_ne!(first.key, second.key);
    /// ```
    ///
    /// # Errors
    /// [`ClientError::Store`]; [`ClientError::Transport`] if the upload
    /// fails: the new key is kept and the next
    /// [`Client::maintain_prekeys`] uploads it.
    ///
    /// # Cancel safety
    /// Safe; an upload committed locally but not confirmed is redone by
    /// the next [`Client::maintain_prekeys`].
    pub async fn rotate_access_key(
        &mut self,
        rng: &mut (impl CryptoRngCore + MaybeSend),
        now: u64,
    ) -> Result<u32, ClientError> {
        check_timestamp(now)?;
        self.saw_time(now);
        if self.store.prekeys().await?.is_none() || self.store.own_access_key().await?.is_none() {
            self.maintain_prekeys(rng, now).await?;
        }
        let mut state = self
            .store
            .prekeys()
            .await?
            .ok_or(ClientError::Protocol(Error::State("no prekeys")))?;
        let epoch = self
            .store
            .own_access_key()
            .await?
            .map_or(0, |a| a.epoch)
            .saturating_add(1);
        let access = AccessKeyRecord {
            epoch,
            key: AccessKey::generate(rng),
            inbox: None,
        };
        let pending = state.upload_pending;
        // Marked pending (with a fresh counter) before the key is stored:
        // whatever is interrupted, the next maintenance uploads.
        state.upload_counter = state.upload_counter.max(now).saturating_add(1);
        state.upload_pending = true;
        self.store.set_prekeys(&state).await?;
        self.store.set_own_access_key(&access).await?;
        if pending {
            // An earlier upload was not confirmed: the full one replaces
            // the pool and carries the new verifier.
            self.maintain_prekeys(rng, now).await?;
            return Ok(epoch);
        }
        let keys = &self.identity.keys;
        let mut upload = BundleSetUpload::new(
            self.identity.device_id,
            keys,
            state.upload_counter,
            state.prekeys.current_signed_prekey(),
            &[],
            false,
        );
        upload.access_verifier = Some(access.key.verifier(&self.address().mailbox()));
        self.publish_upload(&self.identity.keys, upload, rng, now)
            .await?;
        state.upload_pending = false;
        self.store.set_prekeys(&state).await?;
        Ok(epoch)
    }

    /// Stops handing this device's access key to `peers` (devices of a
    /// contact to shut out): the frames sent to them no longer carry it,
    /// then the key is rotated ([`Client::rotate_access_key`]), so once the
    /// relay's grace period for the previous key is over, their deposits
    /// need a stamp and land in the small strangers' share. The other
    /// contacts get the new key in the next frame sent to them. Returns the
    /// new epoch. [`Client::include_contact`] undoes it.
    ///
    /// ```
    /// # use cubbyhole::client::{block_on, Client, ClientConfig};
    /// # use cubbyhole::relay::{InProcessRelay, MemoryRelayStorage, Relay, RelayConfig};
    /// # use cubbyhole::storage::{MemoryStore, Store};
    /// # use cubbyhole::transport::DeviceAddress;
    /// # use rand_core::OsRng;
    /// # let relay = InProcessRelay::new(Relay::new(MemoryRelayStorage::new(), RelayConfig::unpriced()));
    /// # let now = relay.now();
    /// # let mut device = block_on(Client::open(
    /// #     MemoryStore::new(), relay.clone(), relay.clone(), ClientConfig::default(), &mut OsRng,
    /// # )).unwrap();
    /// # let pest = DeviceAddress { identity: [9; 32], device_id: 1 };
    /// block_on(device.exclude_contact(&mut OsRng, &[pest], now)).unwrap();
    /// assert!(block_on(device.store().peer_access(&pest)).unwrap().excluded);
    /// block_on(device.include_contact(&[pest])).unwrap();
    /// assert!(!block_on(device.store().peer_access(&pest)).unwrap().excluded);
    /// ```
    ///
    /// # Errors
    /// [`ClientError::Store`]; [`ClientError::Transport`] as
    /// [`Client::rotate_access_key`] (the exclusion is stored before).
    ///
    /// # Cancel safety
    /// Safe; each exclusion is stored before the rotation: call it again
    /// if it was dropped (a second rotation does no harm).
    pub async fn exclude_contact(
        &mut self,
        rng: &mut (impl CryptoRngCore + MaybeSend),
        peers: &[DeviceAddress],
        now: u64,
    ) -> Result<u32, ClientError> {
        check_timestamp(now)?;
        for peer in peers {
            self.store.set_peer_excluded(peer, true).await?;
        }
        self.rotate_access_key(rng, now).await
    }

    /// Undoes [`Client::exclude_contact`] for `peers`: the next frame sent
    /// to each carries this device's current access key again.
    ///
    /// # Errors
    /// [`ClientError::Store`].
    ///
    /// # Cancel safety
    /// Safe; each device's flag is written on its own (call it again).
    pub async fn include_contact(&mut self, peers: &[DeviceAddress]) -> Result<(), ClientError> {
        for peer in peers {
            self.store.set_peer_excluded(peer, false).await?;
        }
        Ok(())
    }

    /// Whether the peer's identity key is marked compromised (a store
    /// failure is an error, never taken for a compromise).
    async fn is_compromised(&self, peer: &DeviceAddress) -> Result<bool, ClientError> {
        match self.check_trust(peer).await {
            Ok(_) => Ok(false),
            Err(ClientError::Compromised) => Ok(true),
            Err(e) => Err(e),
        }
    }

    async fn check_trust(&self, peer: &DeviceAddress) -> Result<Option<Trust>, ClientError> {
        let trust = fold_trust(&self.store.peers_with_identity(&peer.identity).await?);
        if trust == Some(Trust::Compromised) {
            return Err(ClientError::Compromised);
        }
        Ok(trust)
    }

    /// Sends `body` to a peer device: encrypts it (starting a session from
    /// a fetched, verified bundle if there is no current one), commits the
    /// session record, the envelope to the outbox and the message (kept
    /// until a receipt arrives), and deposits it. The message's delivery
    /// state is then [`Client::delivery`]`(sent.message)`.
    ///
    /// # Errors
    /// [`ClientError::WrongIdentity`] for a substituted bundle,
    /// [`ClientError::Protocol`] for a forged ([`Error::Signature`]) or stale
    /// ([`Error::StaleBundle`]) one, [`ClientError::Compromised`],
    /// [`ClientError::Store`], [`ClientError::Transport`] if the bundle
    /// cannot be fetched. A failed *deposit* is not an error: see [`Sent`].
    ///
    /// # Cancel safety
    /// nothing is ever half-done: the session, the outbox entry
    /// and the message are committed together, then deposited. Dropped before
    /// the commit, nothing was sent; dropped after it, the message is kept and
    /// deposited by [`Client::flush_outbox`] or [`Client::resend`], and
    /// delivered once. A dropped call does not tell which happened (sending
    /// again would send a second message): do not cancel it if you need to
    /// know.
    pub async fn send(
        &mut self,
        rng: &mut (impl CryptoRngCore + MaybeSend),
        to: &DeviceAddress,
        body: &[u8],
        now: u64,
    ) -> Result<Sent, ClientError> {
        check_timestamp(now)?;
        if body.len() > self.config.max_body {
            return Err(ClientError::TooLong);
        }
        let trust = self.check_trust(to).await?;
        let mut id = [0u8; 16];
        rng.fill_bytes(&mut id);
        let mut frame = Frame {
            message: Some((Some(id), body.to_vec())),
            ..Frame::default()
        };
        let (record, entry) = self.encrypt_frame(rng, to, &mut frame, now).await?;
        // The body the frame carried is the one kept for re-sending.
        let mut message = SentMessage {
            id: MessageId(id),
            to: *to,
            body: frame
                .message
                .take()
                .map(|(_, body)| body)
                .unwrap_or_default(),
            state: DeliveryState::Stored,
            created: now,
            last_sent: now,
            sends: 1,
        };
        if self.store.peer(to).await?.is_none() {
            self.store
                .set_peer(&PeerRecord {
                    address: *to,
                    trust: trust.unwrap_or(Trust::Unvalidated),
                    first_seen: now,
                })
                .await?;
        }
        self.store
            .commit_send(&record, &entry, Some(&message))
            .await?;
        // Committed: the message is handed over whatever happens next (a
        // failed deposit, or a store failure recording it, is repaired by
        // `flush_outbox` and `resend`).
        let start = rng.next_u64();
        let deposited = match self.deposit_message(&entry, &mut message, now, start).await {
            Ok(deposited) => deposited,
            Err(ClientError::Store(_)) => false,
            Err(e) => return Err(e),
        };
        Ok(Sent {
            id: entry.envelope.id,
            message: MessageId(id),
            deposited,
        })
    }

    /// Deposits `entry` and moves `message` to its deposited state.
    async fn deposit_message(
        &mut self,
        entry: &OutboxEntry,
        message: &mut SentMessage,
        now: u64,
        start: u64,
    ) -> Result<bool, ClientError> {
        match self.deposit(entry, now, start).await {
            Ok(true) => {
                message.state = deposited_state(message);
                self.store.update_sent(message).await?;
                Ok(true)
            }
            Ok(false) => Ok(false),
            Err(ClientError::Transport(e)) => {
                message.state = DeliveryState::Failed(Failure::Refused);
                message.body.clear();
                self.store.update_sent(message).await?;
                Err(e.into())
            }
            Err(e) => Err(e),
        }
    }

    /// Encrypts a frame for `to` under its current session, starting one
    /// (from a fetched, verified bundle) if there is none. Returns the
    /// updated record and the outbox entry, not yet committed.
    async fn encrypt_frame(
        &mut self,
        rng: &mut (impl CryptoRngCore + MaybeSend),
        to: &DeviceAddress,
        frame: &mut Frame,
        now: u64,
    ) -> Result<(SessionRecord, OutboxEntry), ClientError> {
        let me = self.address();
        let access = match self.store.own_access_key().await {
            Ok(access) => access,
            // Unreadable: frames go without it until it is redrawn.
            Err(StoreError::Corrupted { .. }) => None,
            Err(e) => return Err(e.into()),
        };
        let excluded = match self.store.peer_access(to).await {
            Ok(peer) => peer.excluded,
            // Unreadable: the key is not handed out (fail closed).
            Err(StoreError::Corrupted { .. }) => true,
            Err(e) => return Err(e.into()),
        };
        let stored = self.load_record(to, now).await?;
        let mut record = match stored {
            Some(record) if record.current(&me, to).is_some() => record,
            stored => {
                // No session, or every one was lost or superseded.
                let lost = stored.is_some();
                let mut record = stored.unwrap_or_default();
                let entry = self.new_session(rng, to, &record, lost, now).await?;
                record.insert(entry, self.config.archived_sessions, &me, to);
                record
            }
        };
        let current = record
            .current_mut(&me, to)
            .ok_or(ClientError::Protocol(Error::State("no current session")))?;
        frame.device_id = self.identity.device_id;
        // Prekey messages carry the session's generation (and RESET); so
        // does a frame that would carry nothing else (a notice or an
        // announcement: they normally start a session, but a frame must
        // decode whatever session is current).
        let prekey = current.session.sends_prekey_messages();
        if prekey || (frame.message.is_none() && frame.receipts.is_empty()) {
            frame.generation = Some(current.generation);
            frame.reset = current.reset && prekey;
        }
        // Every frame carries this device's access key, unless the peer
        // is excluded (SPEC.md, "Access keys in the client").
        frame.access = match &access {
            Some(access) if !excluded => Some((access.epoch, access.key.clone())),
            _ => None,
        };
        // With v2, the frame names this device's private inbox for the
        // key's epoch: the peer deposits chain messages there (26.11).
        frame.inbox = None;
        if let (Some(own), false, true) = (&access, excluded, self.config.sealed) {
            // Named only once published: a peer would deposit into it at
            // once. A failed publish leaves it out (the peer keeps using
            // the published mailbox) and is retried at the next frame.
            if let Ok(inbox) = self.ensure_inbox(own, rng, now).await {
                frame.inbox = Some((inbox.address.mailbox().0, inbox.key.clone()));
            }
        }
        let mut plaintext = frame.encode();
        // A v2 session names its envelope (the routing tag, or random for a
        // sealed prekey message); a v1 envelope id is drawn after it.
        let encrypted = if current.session.is_sealed() {
            current
                .session
                .seal(rng, &plaintext)
                .map(|sealed| (Some(sealed.id), sealed.payload))
        } else {
            current.session.encrypt(rng, &plaintext).map(|p| (None, p))
        };
        plaintext.zeroize();
        frame.access = None;
        let (id, payload) = encrypted.map_err(|e| match e {
            Error::PlaintextTooLong => ClientError::TooLong,
            e => ClientError::Protocol(e),
        })?;
        let id = id.unwrap_or_else(|| {
            let mut id = [0u8; 16];
            rng.fill_bytes(&mut id);
            id
        });
        let message = frame.message.as_ref().and_then(|(id, _)| id.map(MessageId));
        let entry = OutboxEntry {
            to: *to,
            envelope: Envelope {
                id: EnvelopeId(id),
                payload,
            },
            created: now,
            message,
        };
        Ok((record, entry))
    }

    /// Starts a session with `to` from a fetched, verified bundle, with a
    /// generation above every one in `record` and at least `now`.
    async fn new_session(
        &mut self,
        rng: &mut (impl CryptoRngCore + MaybeSend),
        to: &DeviceAddress,
        record: &SessionRecord,
        reset: bool,
        now: u64,
    ) -> Result<SessionEntry, ClientError> {
        let bytes = self.directory.fetch_bundle(to).await?;
        let bundle = PrekeyBundle::decode(&bytes)?;
        if bundle.identity().as_bytes() != &to.identity {
            return Err(ClientError::WrongIdentity);
        }
        let bundle = bundle.verify(now, self.config.freshness)?;
        let session = if self.config.sealed {
            Session::initiate_sealed(rng, &self.identity.keys, &bundle, self.config.session)?
        } else {
            Session::initiate(rng, &self.identity.keys, &bundle, self.config.session)?
        };
        let generation = now.max(record.max_generation().saturating_add(1));
        let mut entry = SessionEntry::new(session, generation, now);
        entry.reset = reset;
        Ok(entry)
    }

    /// Encrypts, commits and deposits a control frame (receipts, a notice)
    /// to `to`. Returns whether it was deposited.
    async fn send_control(
        &mut self,
        rng: &mut (impl CryptoRngCore + MaybeSend),
        to: &DeviceAddress,
        frame: Frame,
        now: u64,
    ) -> Result<bool, ClientError> {
        let mut frame = frame;
        let (record, entry) = self.encrypt_frame(rng, to, &mut frame, now).await?;
        self.store.commit_send(&record, &entry, None).await?;
        self.deposit(&entry, now, rng.next_u64()).await
    }

    /// Deposits with retries; removes the entry from the outbox on success.
    async fn deposit(
        &mut self,
        entry: &OutboxEntry,
        now: u64,
        start: u64,
    ) -> Result<bool, ClientError> {
        match self.try_deposit(entry, now, start).await {
            Deposit::Done => {
                self.store.remove_outbox(&entry.envelope.id).await?;
                Ok(true)
            }
            Deposit::Dropped(e) => {
                self.store.remove_outbox(&entry.envelope.id).await?;
                Err(e.into())
            }
            Deposit::Later => Ok(false),
        }
    }

    /// Deposits with retries, writing nothing: the caller records the
    /// outcome ([`Client::deposit`], [`Store::commit_deposits`]).
    ///
    /// The pass (SPEC.md, "Access keys in the client"): the recipient
    /// device's access key if it sent one; without one, a stamp at the
    /// highest difficulty a relay asked of this client so far, minted
    /// before the first try. A refusal for want of a stamp
    /// ([`TransportError::StampRequired`]) is answered once with a stamp at
    /// the difficulty it names (minted at time `now` from nonce `start`),
    /// beside the key; a stamp that is too costly
    /// ([`ClientConfig::max_stamp_bits`]) leaves the entry queued.
    async fn try_deposit(&self, entry: &OutboxEntry, now: u64, start: u64) -> Deposit {
        self.saw_time(now);
        let record = match self.store.peer_access(&entry.to).await {
            Ok(peer) => peer.key,
            // Unreadable: deposit as a stranger would.
            Err(_) => None,
        };
        // A v2 chain message goes to the peer's private inbox when it named
        // one (26.11); everything else (sealed prekey messages, v1) to its
        // published mailbox.
        let published = entry.to.mailbox();
        let (mut mailbox, inbox_key) = match &record {
            Some(AccessKeyRecord {
                inbox: Some((inbox, key)),
                ..
            }) if payload_kind(&entry.envelope.payload) == PayloadKind::Chain => {
                (MailboxId(*inbox), Some(key.clone()))
            }
            _ => (published, None),
        };
        // The inbox's own key there, the published mailbox's elsewhere: the
        // relay never sees one key at both, so it cannot link them (26.11).
        let published_key = record.map(|k| k.key);
        let access = inbox_key.or_else(|| published_key.clone());
        let mut pass = DepositPass {
            access,
            stamp: None,
        };
        let known = self.stamp_difficulty.load(Ordering::Relaxed);
        if pass.access.is_none() && known > 0 {
            pass.stamp = self
                .mint_deposit(&mailbox, &entry.envelope, known, now, start)
                .await;
        }
        let mut stamped_on_request = false;
        let mut attempts = 0;
        while attempts < self.config.deposit_attempts.max(1) {
            match self.mailbox.deposit(&mailbox, &entry.envelope, &pass).await {
                Ok(()) => return Deposit::Done,
                // The peer's inbox is gone (expired, or a relay that lost
                // it): its published mailbox takes the envelope.
                Err(TransportError::NotFound) if mailbox != published => {
                    mailbox = published;
                    pass.access = published_key.clone();
                    continue;
                }
                Err(TransportError::Unavailable(_) | TransportError::Io { .. }) => {
                    attempts += 1;
                    continue;
                }
                Err(TransportError::StampRequired(difficulty)) if !stamped_on_request => {
                    stamped_on_request = true;
                    self.stamp_difficulty
                        .fetch_max(difficulty, Ordering::Relaxed);
                    match self
                        .mint_deposit(&mailbox, &entry.envelope, difficulty, now, start)
                        .await
                    {
                        Some(stamp) => pass.stamp = Some(stamp),
                        None => return Deposit::Later,
                    }
                    continue;
                }
                // Never deliverable: drop it from the outbox (the receiver's
                // counters will show it as missing) and say so.
                Err(e @ TransportError::LimitExceeded(crate::relay::reason::ENVELOPE_SIZE))
                | Err(e @ TransportError::BadRequest(_)) => return Deposit::Dropped(e),
                // Refused for now (mailbox full, rate limited): keep it
                // queued for a later flush and tell the caller.
                Err(_) => return Deposit::Later,
            }
        }
        Deposit::Later
    }

    /// Deposits each committed entry with its sent message, then records
    /// every outcome in one store transaction ([`Store::commit_deposits`],
    /// SPEC.md 25.13): a deposited entry leaves the outbox and its message
    /// becomes deposited; one the relay refuses for good leaves it and its
    /// message fails ([`Failure::Refused`]); one not deposited now stays
    /// queued, its message stored. Returns how many were deposited.
    ///
    /// # Errors
    /// [`ClientError::Store`] if the outcomes could not be recorded: every
    /// entry is then still queued and its message stored, so
    /// [`Client::flush_outbox`] deposits the deposited ones again (same
    /// envelope ids: the relay takes them idempotently).
    pub(crate) async fn deposit_all(
        &mut self,
        items: Vec<(OutboxEntry, SentMessage)>,
        now: u64,
        rng: &mut (impl CryptoRngCore + MaybeSend),
    ) -> Result<usize, ClientError> {
        let mut deposited = 0;
        let mut done = Vec::with_capacity(items.len());
        for (entry, mut message) in items {
            match self.try_deposit(&entry, now, rng.next_u64()).await {
                Deposit::Done => {
                    deposited += 1;
                    message.state = deposited_state(&message);
                }
                Deposit::Dropped(_) => {
                    message.state = DeliveryState::Failed(Failure::Refused);
                    message.body.clear();
                }
                Deposit::Later => continue,
            }
            done.push(DepositDone {
                envelope: entry.envelope.id,
                sent: Some(message),
            });
        }
        self.store.commit_deposits(&done).await?;
        Ok(deposited)
    }

    /// Deposits every envelope left in the outbox (after a crash or a failed
    /// deposit), with the same ids, and records the outcomes (the entries
    /// that left the outbox, their messages' new states) in one store
    /// transaction per 256 entries ([`Store::commit_deposits`]).
    /// Returns how many were deposited. Each deposit shows the recipient's
    /// access key, or a stamp as [`Client::send`]'s does; this method is
    /// given no time, so a stamp is minted for the latest time any other
    /// method was given (or the entry's creation, if later): after a long
    /// pause, call [`Client::resend`] or [`Client::receive`] with the
    /// current time first.
    ///
    /// # Errors
    /// [`ClientError::Store`].
    ///
    /// # Cancel safety
    /// Safe; deposits are idempotent by envelope id, and an
    /// envelope leaves the outbox only after its deposit succeeded (dropped
    /// before its batch is recorded, it is deposited again by the next
    /// flush).
    pub async fn flush_outbox(&mut self) -> Result<usize, ClientError> {
        let mut deposited = 0;
        let mut done = Vec::new();
        for entry in self.store.outbox().await? {
            // No clock here: a stamp is minted for the latest time the
            // client was given (or the entry's own).
            let now = self.last_now.load(Ordering::Relaxed).max(entry.created);
            let start = start_of(&entry.envelope.id);
            let sent = match self.try_deposit(&entry, now, start).await {
                Deposit::Done => {
                    deposited += 1;
                    let sent = match entry.message {
                        Some(id) => match self.store.sent_message(&id).await {
                            Ok(sent) => sent,
                            Err(e) => {
                                // Record what was done before failing.
                                self.store.commit_deposits(&done).await?;
                                return Err(e.into());
                            }
                        },
                        None => None,
                    };
                    // Several entries of one message (a re-send queued
                    // beside the first send) read the same stored state and
                    // record the same new one.
                    sent.filter(|m| m.state == DeliveryState::Stored)
                        .map(|mut m| {
                            m.state = deposited_state(&m);
                            m
                        })
                }
                Deposit::Dropped(_) => None,
                Deposit::Later => continue,
            };
            done.push(DepositDone {
                envelope: entry.envelope.id,
                sent,
            });
            if done.len() >= FLUSH_BATCH {
                self.store.commit_deposits(&done).await?;
                done.clear();
            }
        }
        self.store.commit_deposits(&done).await?;
        Ok(deposited)
    }

    async fn auth(&self, owner: &Owner<'_>, op: MailboxOp) -> Result<MailboxAuth, ClientError> {
        let challenge = self.mailbox.challenge(&owner.address.mailbox()).await?;
        Ok(MailboxAuth::sign(
            owner.keys,
            owner.address.device_id,
            op,
            challenge,
        ))
    }

    /// The mailbox id of this device's current private inbox (profile v2,
    /// SPEC.md 26.11): where its contacts deposit chain messages once they
    /// hold its access key. `None` without v2 (`ClientConfig::sealed`) or
    /// before the device's first publish (no access key yet).
    ///
    /// # Errors
    /// A store failure reading the access key.
    pub async fn private_inbox(&self) -> Result<Option<MailboxId>, ClientError> {
        if !self.config.sealed {
            return Ok(None);
        }
        Ok(self.store.own_access_key().await?.map(|access| {
            inbox_for(&self.identity.keys, access.epoch)
                .address
                .mailbox()
        }))
    }

    /// Publishes the private inbox of `access`'s epoch unless this process
    /// did (SPEC.md 26.11): an upload by the inbox's own identity, with a
    /// signed prekey nobody uses, no one-time prekeys, the access key's
    /// verifier for the inbox's mailbox and, at a priced relay, an identity
    /// stamp. Its counter is `now + 1`; a refusal as replayed means it is
    /// published already.
    async fn ensure_inbox(
        &self,
        access: &AccessKeyRecord,
        rng: &mut (impl CryptoRngCore + MaybeSend),
        now: u64,
    ) -> Result<Inbox, ClientError> {
        let inbox = inbox_for(&self.identity.keys, access.epoch);
        if self.inbox_published.load(Ordering::Relaxed) != access.epoch {
            let spk = SignedPrekey::generate(rng, &inbox.keys, 1, now)?;
            let mut upload = BundleSetUpload::new(
                INBOX_DEVICE_ID,
                &inbox.keys,
                now.saturating_add(1),
                &spk,
                &[],
                true,
            );
            upload.access_verifier = Some(inbox.key.verifier(&inbox.address.mailbox()));
            match self.publish_upload(&inbox.keys, upload, rng, now).await {
                Ok(()) | Err(ClientError::Transport(TransportError::Replayed)) => {
                    self.inbox_published.store(access.epoch, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(inbox)
    }

    /// The mailboxes a receive fetches, in order: with v2, the private
    /// inbox of the current access-key epoch (published first if this
    /// process has not yet, SPEC.md 26.11; the long poll waits on it), the
    /// published mailbox, then the inbox of the previous epoch (contacts
    /// that have not heard of the rotation yet still deposit there).
    async fn owners(
        &self,
        rng: &mut (impl CryptoRngCore + MaybeSend),
        now: u64,
    ) -> Result<Vec<(IdentityKeyPair, DeviceAddress)>, ClientError> {
        let me = (self.identity.keys.clone(), self.address());
        if !self.config.sealed {
            return Ok(vec![me]);
        }
        let access = match self.store.own_access_key().await {
            Ok(Some(access)) => access,
            // No key yet (never published) or unreadable: no inbox yet.
            Ok(None) | Err(StoreError::Corrupted { .. }) => return Ok(vec![me]),
            Err(e) => return Err(e.into()),
        };
        let mut owners = Vec::with_capacity(3);
        match self.ensure_inbox(&access, rng, now).await {
            Ok(current) => owners.push((current.keys, current.address)),
            // Not published (the relay refused or is unreachable for
            // uploads): no contact has been told of it, so nothing waits
            // there; the publish is retried by the next frame or receive.
            Err(ClientError::Transport(_)) => {}
            Err(e) => return Err(e),
        }
        owners.push(me);
        if access.epoch > 1 {
            let previous = inbox_for(&self.identity.keys, access.epoch - 1);
            owners.push((previous.keys, previous.address));
        }
        Ok(owners)
    }

    /// Re-sends what is due, at time `now`:
    ///
    /// - a message without a receipt `resend_after` after it was sent
    ///   (doubling each time, up to `resend_max_interval`) is encrypted
    ///   again, with the same message id, under the peer's current session;
    ///   if nothing at all arrived from the peer since it was sent, the
    ///   session is presumed dead and a new one (from a fresh bundle) is
    ///   started first;
    /// - a message older than `give_up_after` is reported failed;
    /// - a peer whose sessions were all lost (quarantined, restored from a
    ///   backup) gets a new session marked `RESET` at once, so it stops
    ///   using the lost ones.
    ///
    /// [`Client::receive`] calls it after each receive; call it also
    /// periodically when nothing is received (say every few minutes).
    ///
    /// # Errors
    /// [`ClientError::Store`]. A peer that cannot be reached is listed in
    /// [`ResendReport::unreachable`] and tried again by the next call.
    ///
    /// # Cancel safety
    /// Safe; every re-send is committed before it is deposited,
    /// and a later call picks up what a dropped one left.
    pub async fn resend(
        &mut self,
        rng: &mut (impl CryptoRngCore + MaybeSend),
        now: u64,
    ) -> Result<ResendReport, ClientError> {
        check_timestamp(now)?;
        self.saw_time(now);
        self.resend_urgent(rng, now, &HashSet::new(), true).await
    }

    /// [`Client::resend`]; `scan_lost`: look at every record for peers
    /// whose sessions were all lost (otherwise only the `urgent` ones: a
    /// receive does not decode every record when nothing asks for it).
    async fn resend_urgent(
        &mut self,
        rng: &mut (impl CryptoRngCore + MaybeSend),
        now: u64,
        urgent: &HashSet<DeviceAddress>,
        scan_lost: bool,
    ) -> Result<ResendReport, ClientError> {
        let mut report = ResendReport::default();
        let me = self.address();
        // Due messages, by peer, oldest first.
        let mut due: Vec<(DeviceAddress, Vec<SentMessage>)> = Vec::new();
        // Pending messages by peer (to presume a session dead by count).
        let mut pending: Vec<(DeviceAddress, Vec<SentMessage>)> = Vec::new();
        for mut m in self.store.pending_sent().await? {
            let compromised = match self.is_compromised(&m.to).await {
                Ok(c) => c,
                Err(ClientError::Store(e @ StoreError::Corrupted { .. })) => {
                    // Its trust cannot be read: it waits (fail closed).
                    report.problems.push(e.to_string());
                    continue;
                }
                Err(e) => return Err(e),
            };
            let failure = if now.saturating_sub(m.created) > self.config.give_up_after {
                Some(Failure::TimedOut)
            } else if compromised {
                Some(Failure::Compromised)
            } else {
                None
            };
            if let Some(failure) = failure {
                m.state = DeliveryState::Failed(failure);
                m.body.clear();
                self.store.update_sent(&m).await?;
                report.failed.push((m.id, failure));
                continue;
            }
            let shift = m.sends.saturating_sub(1).min(32);
            let wait = self.config.resend_after.saturating_mul(1u64 << shift).min(
                self.config
                    .resend_max_interval
                    .max(self.config.resend_after),
            );
            let is_due = urgent.contains(&m.to) || now >= m.last_sent.saturating_add(wait);
            for (list, take) in [(&mut due, is_due), (&mut pending, true)] {
                if !take {
                    continue;
                }
                match list.iter_mut().find(|(a, _)| *a == m.to) {
                    Some((_, l)) => l.push(m.clone()),
                    None => list.push((m.to, vec![m.clone()])),
                }
            }
        }
        // A session is presumed dead also when dead_after_messages messages
        // were handed over for the peer since it started and nothing has
        // arrived from the peer since: all its pending messages go now, on
        // a new session.
        let mut force_dead = HashSet::new();
        let limit = self.config.dead_after_messages.max(1) as usize;
        for (peer, messages) in pending {
            if messages.len() < limit {
                continue;
            }
            let Ok(Some(record)) = self.store.session(&peer).await else {
                continue;
            };
            let Some(current) = record.current(&me, &peer) else {
                continue;
            };
            let heard = record.entries().iter().map(|e| e.last_received).max();
            let since: Vec<u64> = messages
                .iter()
                .map(|m| m.created)
                .filter(|created| *created >= current.created)
                .collect();
            let first = since.iter().min().copied().unwrap_or(u64::MAX);
            if since.len() >= limit && heard.unwrap_or(0) < first {
                force_dead.insert(peer);
                match due.iter_mut().find(|(a, _)| *a == peer) {
                    Some((_, list)) => *list = messages,
                    None => due.push((peer, messages)),
                }
            }
        }
        // Peers whose sessions were all lost get a RESET session now.
        let lost: Vec<(DeviceAddress, SessionRecord)> = if scan_lost {
            self.store
                .sessions()
                .await?
                .into_iter()
                .filter_map(|(peer, r)| Some((peer, r.ok()?)))
                .collect()
        } else {
            let mut records = Vec::new();
            for peer in urgent {
                if let Ok(Some(record)) = self.store.session(peer).await {
                    records.push((*peer, record));
                }
            }
            records
        };
        for (peer, record) in lost {
            if record.current(&me, &peer).is_none()
                && !due.iter().any(|(a, _)| *a == peer)
                && !self.is_compromised(&peer).await?
            {
                due.push((peer, Vec::new()));
            }
        }
        for (peer, messages) in due {
            let force = force_dead.contains(&peer);
            match self
                .resend_to(rng, &peer, messages, now, force, &mut report)
                .await
            {
                Ok(()) => {}
                Err(ClientError::Store(e)) => return Err(e.into()),
                Err(_) => report.unreachable.push(peer),
            }
        }
        Ok(report)
    }

    async fn resend_to(
        &mut self,
        rng: &mut (impl CryptoRngCore + MaybeSend),
        peer: &DeviceAddress,
        messages: Vec<SentMessage>,
        now: u64,
        force_dead: bool,
        report: &mut ResendReport,
    ) -> Result<(), ClientError> {
        let me = self.address();
        let stored = self.load_record(peer, now).await?;
        let existed = stored.is_some();
        let record = stored.unwrap_or_default();
        let heard = record
            .entries()
            .iter()
            .map(|e| e.last_received)
            .max()
            .unwrap_or(0);
        let oldest = messages.iter().map(|m| m.last_sent).min().unwrap_or(0);
        let fresh_since = record.current(&me, peer).map(|c| c.created);
        // Presumed dead: nothing arrived since the oldest due message was
        // sent on it (the peer answers every message with a receipt).
        let dead = force_dead
            || (!messages.is_empty()
                && heard < oldest
                && fresh_since.is_some_and(|created| created <= oldest));
        let lost = fresh_since.is_none();
        if dead || lost {
            let mut record = record;
            let entry = self
                .new_session(rng, peer, &record, lost && existed, now)
                .await?;
            record.insert(entry, self.config.archived_sessions, &me, peer);
            self.store.set_session(peer, &record).await?;
            report.new_sessions += 1;
            if messages.is_empty() {
                // Nothing to re-send: an empty control frame carries the
                // session (and its RESET) to the peer.
                let frame = Frame::default();
                self.send_control(rng, peer, frame, now).await?;
            }
        }
        for mut m in messages {
            let mut frame = Frame {
                message: Some((Some(m.id.0), std::mem::take(&mut m.body))),
                ..Frame::default()
            };
            let encrypted = self.encrypt_frame(rng, peer, &mut frame, now).await;
            m.body = frame
                .message
                .take()
                .map(|(_, body)| body)
                .unwrap_or_default();
            let (record, entry) = encrypted?;
            m.sends = m.sends.saturating_add(1);
            m.last_sent = now;
            m.state = DeliveryState::Stored;
            self.store.commit_send(&record, &entry, Some(&m)).await?;
            report.resent += 1;
            let start = rng.next_u64();
            self.deposit_message(&entry, &mut m, now, start).await?;
        }
        Ok(())
    }

    /// Receives everything pending: fetches envelopes in batches, decrypts,
    /// commits each batch atomically to the store (session records,
    /// consumed one-time prekeys and replay digests, inbox messages,
    /// processed marks, receipts that arrived), then acknowledges it.
    /// Messages appear in the store's inbox ([`Client::inbox`]). Then it
    /// sends receipts for what arrived, dead-session notices for prekey
    /// messages it could not accept from known peers, and re-sends what is
    /// due ([`Client::resend`]).
    ///
    /// # Errors
    /// [`ClientError::Store`], [`ClientError::Transport`] (of the fetch or
    /// acknowledgement). Nothing is acknowledged that was not committed
    /// first. Receipts and notices that cannot be deposited are not errors:
    /// the peer re-sends, and is answered again.
    ///
    /// # Cancel safety
    /// Safe, as [`Client::receive_waiting`].
    pub async fn receive(
        &mut self,
        rng: &mut (impl CryptoRngCore + MaybeSend),
        now: u64,
    ) -> Result<ReceiveReport, ClientError> {
        check_timestamp(now)?;
        self.receive_waiting(rng, now, 0).await
    }

    /// [`Client::receive`], but when nothing is pending the first fetch waits
    /// up to `wait_ms` milliseconds for an envelope (a long poll, if the
    /// mailbox supports it), so an online device gets messages as they
    /// arrive without polling in a loop.
    ///
    /// # Errors
    /// As [`Client::receive`].
    ///
    /// # Cancel safety
    /// Safe: nothing is lost or shown twice. Dropped while
    /// waiting or fetching, nothing changed; dropped after a batch was
    /// committed but before it was acknowledged, the next receive fetches the
    /// batch again, recognizes every envelope as processed and acknowledges it
    /// (receipts are sent again then). So a receive loop may be cancelled at
    /// any await, e.g. by `tokio::select!` on user input.
    pub async fn receive_waiting(
        &mut self,
        rng: &mut (impl CryptoRngCore + MaybeSend),
        now: u64,
        wait_ms: u32,
    ) -> Result<ReceiveReport, ClientError> {
        check_timestamp(now)?;
        self.saw_time(now);
        let mut report = ReceiveReport::default();
        let mut wait_ms = wait_ms;
        let mut urgent = HashSet::new();
        let mut answers = Answers::default();
        let mut gap_counts: HashMap<DeviceAddress, usize> = HashMap::new();
        let owners = self.owners(rng, now).await?;
        if wait_ms > 0 && owners.len() > 1 {
            // With v2, a message may arrive in either of two mailboxes: the
            // current inbox (chain messages) or the published mailbox
            // (first contacts, new sessions). Long-poll both at once and
            // go on when either answers; the fetches below take what came
            // (a long poll consumes nothing, so dropping the other is safe).
            let mut waits = Vec::with_capacity(2);
            for (keys, address) in owners.iter().take(2) {
                let owner = Owner {
                    keys,
                    address: *address,
                };
                waits.push(self.auth(&owner, MailboxOp::Fetch).await?);
            }
            if let [first, second] = &waits[..] {
                let a = self.mailbox.fetch_waiting(first, 1, wait_ms);
                let b = self.mailbox.fetch_waiting(second, 1, wait_ms);
                FirstOf(Box::pin(a), Box::pin(b)).await;
            }
            wait_ms = 0;
        }
        for (keys, address) in &owners {
            let owner = Owner {
                keys,
                address: *address,
            };
            let inbox = owner.address.device_id == INBOX_DEVICE_ID && *address != self.address();
            for _ in 0..self.config.max_receive_rounds.max(1) {
                let fetched = match self.auth(&owner, MailboxOp::Fetch).await {
                    Ok(auth) => {
                        self.mailbox
                            .fetch_waiting(&auth, self.config.receive_batch, wait_ms)
                            .await
                    }
                    Err(ClientError::Transport(e)) => Err(e),
                    Err(e) => return Err(e),
                };
                let envelopes = match fetched {
                    Ok(envelopes) => envelopes,
                    // An inbox the relay does not know (the previous epoch's
                    // of a device that used v2 only later, or one that
                    // expired) holds nothing: skipped.
                    Err(TransportError::NotFound) if inbox => break,
                    Err(e) => return Err(e.into()),
                };
                wait_ms = 0;
                if envelopes.is_empty() {
                    break;
                }
                let redelivered_before = report.redelivered;
                let (ids, batch) = self.process_batch(&envelopes, now, &mut report).await?;
                for peer in &batch.touched {
                    if let Some(record) = batch.records.get(peer) {
                        gap_counts.insert(*peer, gaps(record));
                    }
                }
                let auth = self.auth(&owner, MailboxOp::Acknowledge).await?;
                self.mailbox.acknowledge(&auth, &ids).await?;
                // Answered once, after the last batch: one receipt per sender
                // per receive, however many batches it took.
                answers.take(batch);
                // Fetch until the mailbox is empty (a batch may be cut short by
                // the relay's byte limit), but stop if a batch held nothing new.
                if report.redelivered - redelivered_before == envelopes.len() {
                    break;
                }
            }
        }
        self.answer(rng, answers, now, &mut report, &mut urgent)
            .await?;
        let cutoff = now.saturating_sub(self.config.processed_retention);
        self.store.prune_processed(cutoff).await?;
        self.store.prune_sent(cutoff).await?;
        urgent.extend(report.quarantined.iter().copied());
        report.resend = match self.resend_urgent(rng, now, &urgent, false).await {
            Ok(resend) => resend,
            // The batches are committed: a row that does not load stops
            // the re-send step, not the receive.
            Err(ClientError::Store(e @ StoreError::Corrupted { .. })) => ResendReport {
                problems: vec![e.to_string()],
                ..ResendReport::default()
            },
            Err(e) => return Err(e),
        };
        let mut missing: Vec<(DeviceAddress, usize)> =
            gap_counts.into_iter().filter(|(_, n)| *n > 0).collect();
        missing.sort_unstable();
        report.missing = missing;
        Ok(report)
    }

    /// After a committed batch: receipts, dead-session notices.
    async fn answer(
        &mut self,
        rng: &mut (impl CryptoRngCore + MaybeSend),
        batch: Answers,
        now: u64,
        report: &mut ReceiveReport,
        urgent: &mut HashSet<DeviceAddress>,
    ) -> Result<(), ClientError> {
        urgent.extend(batch.urgent);
        for (peer, ids) in batch.receipts {
            if self.is_compromised(&peer).await? {
                continue;
            }
            for chunk in ids.chunks(1024) {
                let frame = Frame {
                    receipts: chunk.to_vec(),
                    ..Frame::default()
                };
                match self.send_control(rng, &peer, frame, now).await {
                    Ok(_) => {}
                    Err(ClientError::Store(e)) => return Err(e.into()),
                    // The sender re-sends, and is answered again.
                    Err(_) => break,
                }
            }
        }
        for (identity, tag) in batch.unaccepted {
            for peer in self.store.peers_with_identity(&identity).await? {
                if peer.trust == Trust::Compromised
                    || self
                        .notices
                        .get(&peer.address)
                        .is_some_and(|at| now.saturating_sub(*at) < self.config.notice_interval)
                {
                    continue;
                }
                self.notices.insert(peer.address, now);
                // A new session carries the notice: only we can make it
                // (X3DH authenticates us), and it is what the peer needs
                // anyway to reach us again.
                let me = self.address();
                let stored = self.load_record(&peer.address, now).await?;
                // No current session although a record exists: ours were
                // lost too, and the notice's session says so (RESET).
                let lost = stored
                    .as_ref()
                    .is_some_and(|r| r.current(&me, &peer.address).is_none());
                let mut record = stored.unwrap_or_default();
                let entry = match self
                    .new_session(rng, &peer.address, &record, lost, now)
                    .await
                {
                    Ok(entry) => entry,
                    Err(ClientError::Store(e)) => return Err(e.into()),
                    Err(_) => continue,
                };
                record.insert(entry, self.config.archived_sessions, &me, &peer.address);
                self.store.set_session(&peer.address, &record).await?;
                let frame = Frame {
                    dead: vec![tag],
                    ..Frame::default()
                };
                match self.send_control(rng, &peer.address, frame, now).await {
                    Ok(_) => report.notices.push(peer.address),
                    Err(ClientError::Store(e)) => return Err(e.into()),
                    Err(_) => {}
                }
            }
        }
        Ok(())
    }

    /// Per peer device, how many messages the ratchet counters show were
    /// sent but have not arrived (up to the skipped-key cap), over all its
    /// sessions.
    ///
    /// # Errors
    /// [`ClientError::Store`].
    ///
    /// # Cancel safety
    /// Safe (a read).
    pub async fn missing(&self) -> Result<Vec<(DeviceAddress, usize)>, ClientError> {
        Ok(self
            .store
            .sessions()
            .await?
            .into_iter()
            .filter_map(|(a, r)| {
                let n = gaps(&r.ok()?);
                (n > 0).then_some((a, n))
            })
            .collect())
    }

    /// Messages received and not yet taken by the application, in order.
    ///
    /// # Errors
    /// [`ClientError::Store`].
    ///
    /// # Cancel safety
    /// Safe (a read).
    pub async fn inbox(&self) -> Result<Vec<InboxMessage>, ClientError> {
        Ok(self.store.inbox().await?)
    }

    /// Removes a message the application has shown or saved.
    ///
    /// # Errors
    /// [`ClientError::Store`].
    ///
    /// # Cancel safety
    /// Safe; the message is removed or not (removing it again
    /// succeeds).
    pub async fn remove_from_inbox(&mut self, id: &EnvelopeId) -> Result<(), ClientError> {
        Ok(self.store.remove_inbox(id).await?)
    }

    /// Loads a peer's record into the batch's working copies, unless it is
    /// there already; a record that does not load is quarantined.
    async fn load_into(
        &mut self,
        b: &mut Batch,
        peer: DeviceAddress,
        now: u64,
        report: &mut ReceiveReport,
    ) -> Result<(), ClientError> {
        if b.records.contains_key(&peer) {
            return Ok(());
        }
        match self.store.session(&peer).await {
            Ok(Some(record)) => self.insert_loaded(b, peer, Ok(record), now, report).await,
            Ok(None) => Ok(()),
            Err(e @ StoreError::Corrupted { .. }) => {
                self.insert_loaded(b, peer, Err(e), now, report).await
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Adds a loaded record to the batch (unless one is there already);
    /// a record that did not decode is quarantined and replaced by an
    /// empty one.
    async fn insert_loaded(
        &mut self,
        b: &mut Batch,
        peer: DeviceAddress,
        record: Result<SessionRecord, StoreError>,
        now: u64,
        report: &mut ReceiveReport,
    ) -> Result<(), ClientError> {
        if b.records.contains_key(&peer) {
            return Ok(());
        }
        match record {
            Ok(record) => {
                b.records.insert(peer, record);
            }
            Err(e @ StoreError::Corrupted { .. }) => {
                // Set aside, and recovered for this peer alone.
                self.quarantine(&peer, now, &e).await?;
                report.quarantined.push(peer);
                b.records.insert(peer, SessionRecord::new());
            }
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    /// Before a message is opened: if it starts a chain that no loaded
    /// record knows, loads the records that await a new ratchet key, most
    /// recently written first, until one decrypts it (a trial on a copy:
    /// nothing changes), or all of them if none does: only they can own it.
    /// Prekey messages and messages under a known key were routed when the
    /// batch began.
    async fn route(
        &mut self,
        envelope: &Envelope,
        now: u64,
        b: &mut Batch,
        report: &mut ReceiveReport,
    ) -> Result<(), ClientError> {
        b.new_chain_owner = None;
        let Ok(incoming) = Incoming::decode(&envelope.payload) else {
            return Ok(());
        };
        if incoming.prekey().is_some() {
            return Ok(());
        }
        let key = &incoming.header().ratchet_key;
        if b.records
            .values()
            .any(|r| r.ratchet_keys().any(|k| &k == key))
        {
            return Ok(());
        }
        b.new_chain_owner = b
            .records
            .iter()
            .find(|(_, r)| opens_new_chain(r, &incoming))
            .map(|(a, _)| *a);
        if b.new_chain_owner.is_some() {
            return Ok(());
        }
        if b.awaiting.is_none() {
            let mut order = self.store.awaiting_ratchet_key().await?;
            order.reverse(); // popped from the end: most recent first
            b.awaiting = Some(order);
        }
        while let Some(peer) = b.awaiting.as_mut().and_then(Vec::pop) {
            if b.records.contains_key(&peer) {
                continue; // already tried above
            }
            self.load_into(b, peer, now, report).await?;
            if b.records
                .get(&peer)
                .is_some_and(|r| opens_new_chain(r, &incoming))
            {
                b.new_chain_owner = Some(peer);
                break;
            }
        }
        Ok(())
    }

    /// Decrypts a fetched batch against working copies of the session
    /// records and prekeys, commits it in one transaction, and returns the
    /// ids to acknowledge with what is left to answer.
    async fn process_batch(
        &mut self,
        envelopes: &[Envelope],
        now: u64,
        report: &mut ReceiveReport,
    ) -> Result<(Vec<EnvelopeId>, Batch), ClientError> {
        let mut b = Batch {
            prekeys: self.store.prekeys().await?,
            ..Batch::default()
        };
        let mut seen_in_batch = HashSet::new();
        let mut ack = Vec::with_capacity(envelopes.len());
        // One lookup for the batch's envelope marks, one for its message
        // marks (SQLite: one query each instead of one per envelope).
        let ids: Vec<EnvelopeId> = envelopes.iter().map(|e| e.id).collect();
        let done = self.store.processed_among(&ids).await?;
        // Only the records the batch's messages name are loaded: by the
        // header's ratchet key (one index lookup for the batch), by the
        // sender's identity key for a prekey message, and the records that
        // await a new ratchet key only if a message starts a chain no
        // loaded record knows (see `route`).
        let mut keys = Vec::new();
        let mut identities = Vec::new();
        // Sealed prekey messages are opened once, here (one X25519 per
        // signed prekey tried, SPEC.md 26.7), and their inner message is
        // routed like a v1 prekey message.
        let mut inners: Vec<Option<Result<Zeroizing<Vec<u8>>, Error>>> =
            Vec::with_capacity(envelopes.len());
        for (envelope, done) in envelopes.iter().zip(&done) {
            let mut inner = None;
            if !*done {
                match payload_kind(&envelope.payload) {
                    PayloadKind::Chain => keys.push(tag_route_key(&envelope.id.0)),
                    PayloadKind::SealedPrekey => {
                        let opened = match &b.prekeys {
                            Some(state) => state.prekeys.open_sealed(&envelope.payload),
                            None => Err(Error::UnknownPrekey),
                        };
                        if let Some(fields) = opened
                            .as_ref()
                            .ok()
                            .and_then(|m| Incoming::decode(m).ok()?.prekey().copied())
                        {
                            identities.push(fields.identity);
                        }
                        inner = Some(opened);
                    }
                    PayloadKind::OtherV2 => {}
                    PayloadKind::V1 => {
                        if let Ok(incoming) = Incoming::decode(&envelope.payload) {
                            match incoming.prekey() {
                                Some(fields) => identities.push(fields.identity),
                                None => keys.push(incoming.header().ratchet_key),
                            }
                        }
                    }
                }
            }
            inners.push(inner);
        }
        keys.sort_unstable();
        keys.dedup();
        identities.sort_unstable();
        identities.dedup();
        if !keys.is_empty() {
            for peer in self.store.route_ratchet_keys(&keys).await? {
                self.load_into(&mut b, peer, now, report).await?;
            }
        }
        for identity in &identities {
            for (peer, record) in self.store.sessions_with_identity(identity).await? {
                self.insert_loaded(&mut b, peer, record, now, report)
                    .await?;
            }
        }
        let mut opened = Vec::with_capacity(envelopes.len());
        for ((envelope, done), inner) in envelopes.iter().zip(done).zip(&inners) {
            ack.push(envelope.id);
            if !seen_in_batch.insert(envelope.id) || done {
                report.redelivered += 1;
                continue;
            }
            let result = match inner {
                Some(Ok(inner)) => self.open_message(inner, now, &mut b).await,
                Some(Err(e)) => Err(Rejection::Protocol(*e)),
                None if payload_kind(&envelope.payload) == PayloadKind::Chain => {
                    self.open_chain(envelope, now, &mut b).await
                }
                None if payload_kind(&envelope.payload) == PayloadKind::OtherV2 => {
                    Err(Rejection::Protocol(Error::Decode("kind")))
                }
                None => {
                    self.route(envelope, now, &mut b, report).await?;
                    self.open_message(&envelope.payload, now, &mut b).await
                }
            };
            if let Some(e) = b.failed.take() {
                return Err(e.into());
            }
            match result {
                Ok((from, frame)) => opened.push((envelope.id, from, frame)),
                Err(why) => {
                    if let Rejection::Prekey { identity, .. } = why {
                        let bytes = match inner {
                            Some(Ok(inner)) => &inner[..],
                            _ => &envelope.payload[..],
                        };
                        if let Some(fields) = Incoming::decode(bytes)
                            .ok()
                            .and_then(|i| i.prekey().copied())
                        {
                            b.unaccepted
                                .push((identity, session_tag(&fields.ephemeral)));
                        }
                    }
                    report.rejected.push((envelope.id, why));
                    b.processed.push((envelope.id, None));
                }
            }
        }
        let marks: Vec<EnvelopeId> = opened
            .iter()
            .filter_map(|(_, from, frame)| {
                let id = frame.message.as_ref()?.0?;
                Some(seen_mark(from, &id))
            })
            .collect();
        let found = self.store.processed_among(&marks).await?;
        let already: HashSet<EnvelopeId> = marks
            .into_iter()
            .zip(found)
            .filter_map(|(mark, found)| found.then_some(mark))
            .collect();
        for (envelope_id, from, frame) in opened {
            let message = self
                .take_frame(from, frame, now, &mut b, report, &already)
                .await?;
            let index = message.map(|body| {
                b.messages.push(InboxMessage {
                    envelope_id,
                    from,
                    body,
                    received_at: now,
                });
                report.received += 1;
                b.messages.len() - 1
            });
            b.processed.push((envelope_id, index));
        }
        self.commit_batch(&b, now).await?;
        Ok((ack, b))
    }

    /// One transaction for the whole batch: every envelope's mark and
    /// message, the marks of the message ids shown, each touched record's
    /// final state, the prekeys if they changed, new peers and sent
    /// messages whose receipt arrived.
    async fn commit_batch(&mut self, b: &Batch, now: u64) -> Result<(), ClientError> {
        let Some(&(last, _)) = b.processed.last() else {
            return Ok(());
        };
        let blank = |id: EnvelopeId| ReceiveCommit {
            envelope_id: id,
            processed_at: now,
            session: None,
            prekeys: None,
            peer: None,
            message: None,
            sent: None,
            access: None,
        };
        let mut commits: Vec<ReceiveCommit<'_>> = Vec::with_capacity(
            b.processed.len()
                + b.seen.len()
                + b.touched.len()
                + b.new_peers.len()
                + b.sent.len()
                + b.access.len()
                + 1,
        );
        for (peer, key) in &b.access {
            commits.push(ReceiveCommit {
                access: Some((peer, key)),
                ..blank(last)
            });
        }
        for (id, index) in &b.processed {
            commits.push(ReceiveCommit {
                message: index.map(|i| &b.messages[i]),
                ..blank(*id)
            });
        }
        commits.extend(b.seen.iter().map(|id| blank(*id)));
        for address in &b.touched {
            if let Some(record) = b.records.get(address) {
                commits.push(ReceiveCommit {
                    session: Some((address, record)),
                    ..blank(last)
                });
            }
        }
        for peer in &b.new_peers {
            commits.push(ReceiveCommit {
                peer: Some(peer),
                ..blank(last)
            });
        }
        for sent in &b.sent {
            commits.push(ReceiveCommit {
                sent: Some(sent),
                ..blank(last)
            });
        }
        if b.prekeys_changed {
            commits.push(ReceiveCommit {
                prekeys: b.prekeys.as_ref(),
                ..blank(last)
            });
        }
        self.store.commit_receive(&commits).await?;
        Ok(())
    }

    /// Applies a decrypted frame's control fields and decides whether its
    /// message is shown: returns the body to show, if any.
    async fn take_frame(
        &self,
        from: DeviceAddress,
        mut frame: Frame,
        now: u64,
        b: &mut Batch,
        report: &mut ReceiveReport,
        already: &HashSet<EnvelopeId>,
    ) -> Result<Option<Vec<u8>>, ClientError> {
        if let Some((epoch, key)) = frame.access.take() {
            let inbox = frame.inbox.take();
            // Kept only if newer than what is held: a replayed or
            // reordered older frame never brings back a rotated key. The
            // same epoch is taken again only to add the inbox a v1-era
            // record lacks (an epoch names one inbox).
            let known = match b.access_epochs.get(&from) {
                Some(known) => *known,
                None => match self.store.peer_access(&from).await {
                    Ok(peer) => peer.key.map(|k| (k.epoch, k.inbox.is_some())),
                    // Unreadable: replaced by the key received.
                    Err(StoreError::Corrupted { .. }) => None,
                    Err(e) => return Err(e.into()),
                },
            };
            let newer = known.is_none_or(|(known, has_inbox)| {
                epoch > known || (epoch == known && !has_inbox && inbox.is_some())
            });
            if newer {
                b.access_epochs.insert(from, Some((epoch, inbox.is_some())));
                b.access.insert(from, AccessKeyRecord { epoch, key, inbox });
            } else {
                b.access_epochs.insert(from, known);
            }
        }
        if !frame.dead.is_empty() {
            let record = b.records.entry(from).or_default();
            let mut hit = false;
            for id in &frame.dead {
                hit |= record.supersede(id);
            }
            if hit {
                b.touch(from);
                b.urgent.insert(from);
            }
        }
        for id in &frame.receipts {
            let id = MessageId(*id);
            let known = match b.sent.iter().position(|m| m.id == id) {
                Some(_) => None,
                None => self.store.sent_message(&id).await?,
            };
            if let Some(mut m) = known {
                if m.to == from && m.state.is_pending() {
                    m.state = DeliveryState::Delivered;
                    m.body.clear();
                    report.delivered.push(id);
                    b.sent.push(m);
                }
            }
        }
        if b.known.insert(from) && self.store.peer(&from).await?.is_none() {
            // A new device: it inherits its identity key's trust.
            let trust = self.peer_trust(&mut b.peers, &from.identity).await?;
            b.new_peers.push(PeerRecord {
                address: from,
                trust: trust.unwrap_or(Trust::Unvalidated),
                first_seen: now,
            });
        }
        let Some((id, body)) = frame.message else {
            return Ok(None);
        };
        let Some(id) = id else {
            return Ok(Some(body)); // a v1 frame: no id, no receipt
        };
        b.receipt(from, id);
        let mark = seen_mark(&from, &id);
        if b.seen.contains(&mark) || already.contains(&mark) {
            report.duplicates += 1;
            return Ok(None);
        }
        b.seen.insert(mark);
        Ok(Some(body))
    }

    /// Routes and opens a v2 chain message (SPEC.md 26.6): the session
    /// whose routing tags hold the envelope id. The batch loaded the records
    /// the store's index names for the batch's tags; the working copies are
    /// tried in turn (a session that does not expect the tag answers
    /// `SessionMismatch` after at most 2W + its skipped keys HMACs, and
    /// changes nothing), so a record that moved its window within the batch
    /// is found too.
    async fn open_chain(
        &self,
        envelope: &Envelope,
        now: u64,
        b: &mut Batch,
    ) -> Result<(DeviceAddress, Frame), Rejection> {
        let mut plaintext = Vec::new();
        let mut found = None;
        'records: for (address, record) in b.records.iter_mut() {
            for (i, entry) in record.entries_mut().iter_mut().enumerate() {
                if !entry.session.is_sealed() {
                    continue;
                }
                match entry.session.open(
                    &envelope.id.0,
                    &envelope.payload,
                    ROUTING_WINDOW,
                    &mut plaintext,
                ) {
                    Ok(()) => {
                        found = Some((*address, i));
                        break 'records;
                    }
                    Err(Error::SessionMismatch) => {}
                    // The tag is this session's: the envelope is rejected
                    // with its error, no other session is tried.
                    Err(e) => return Err(Rejection::Protocol(e)),
                }
            }
        }
        let (address, index) = found.ok_or(Rejection::NoSession)?;
        self.finish_open(address, index, plaintext, now, b).await
    }

    /// Routes and decrypts one v1 message or prekey message, or the inner
    /// prekey message of a v2 sealed prekey message, against the working
    /// copies; records every record it changed in `b.touched`.
    async fn open_message(
        &self,
        bytes: &[u8],
        now: u64,
        b: &mut Batch,
    ) -> Result<(DeviceAddress, Frame), Rejection> {
        let incoming = Incoming::decode(bytes).map_err(Rejection::Protocol)?;
        let mut plaintext = Vec::new();
        // The session the message belongs to: by IK_A and EK_A for a prekey
        // message, by the header's ratchet key otherwise; archived sessions
        // included.
        let found = match incoming.prekey() {
            Some(fields) => b
                .records
                .iter()
                .filter(|(a, _)| a.identity == fields.identity)
                .find_map(|(a, r)| {
                    r.entries()
                        .iter()
                        .position(|e| e.session.matches(&incoming))
                        .map(|i| (*a, i))
                }),
            None => {
                let key = &incoming.header().ratchet_key;
                b.records.iter().find_map(|(a, r)| {
                    r.entries()
                        .iter()
                        .position(|e| e.session.receiving_ratchet_keys().any(|k| k == key))
                        .map(|i| (*a, i))
                })
            }
        };
        let (address, index) = match found {
            Some((address, index)) => {
                let entry = b
                    .records
                    .get_mut(&address)
                    .and_then(|r| r.entries_mut().get_mut(index))
                    .ok_or(Rejection::NoSession)?;
                entry
                    .session
                    .decrypt_incoming(&incoming, &mut plaintext)
                    .map_err(Rejection::Protocol)?;
                (address, index)
            }
            None if incoming.prekey().is_some() => {
                return self.accept_new(&incoming, now, b).await;
            }
            None => {
                // A new chain: only a session that awaits one can own it,
                // the one `route` found first. Decryption is staged, so a
                // wrong try changes nothing.
                let hint = b.new_chain_owner.take();
                let hinted = hint.and_then(|a| {
                    let r = b.records.get_mut(&a)?;
                    decrypt_new_chain(r, &incoming, &mut plaintext).map(|i| (a, i))
                });
                match hinted {
                    Some(found) => found,
                    None => b
                        .records
                        .iter_mut()
                        .find_map(|(a, r)| {
                            decrypt_new_chain(r, &incoming, &mut plaintext).map(|i| (*a, i))
                        })
                        .ok_or(Rejection::NoSession)?,
                }
            }
        };
        self.finish_open(address, index, plaintext, now, b).await
    }

    /// After a session of `address` (entry `index`) decrypted a message:
    /// the checks after decryption (SPEC.md 18.3).
    async fn finish_open(
        &self,
        address: DeviceAddress,
        index: usize,
        plaintext: Vec<u8>,
        now: u64,
        b: &mut Batch,
    ) -> Result<(DeviceAddress, Frame), Rejection> {
        b.touch(address);
        if let Some(entry) = b
            .records
            .get_mut(&address)
            .and_then(|r| r.entries_mut().get_mut(index))
        {
            entry.last_received = now;
        }
        let frame = Frame::decode(plaintext).map_err(|_| Rejection::BadFrame)?;
        if frame.device_id != address.device_id {
            return Err(Rejection::BadFrame);
        }
        self.refuse_compromised(b, &address.identity).await?;
        Ok((address, frame))
    }

    /// Starts a session from a prekey message no session owns. Nothing is
    /// consumed or stored unless it is not a replay, the key is not
    /// compromised, it decrypts and its frame is valid.
    async fn accept_new(
        &self,
        incoming: &Incoming<'_>,
        now: u64,
        b: &mut Batch,
    ) -> Result<(DeviceAddress, Frame), Rejection> {
        let fields = incoming.prekey().ok_or(Rejection::NoSession)?;
        let identity = fields.identity;
        let digest = accepted_digest(&identity, &fields.ephemeral);
        let unaccepted = |error| Rejection::Prekey { identity, error };
        let replay = b
            .prekeys
            .as_ref()
            .ok_or(unaccepted(Error::UnknownPrekey))?
            .accepted
            .iter()
            .any(|(_, d)| d == &digest);
        if replay {
            return Err(Rejection::Protocol(Error::Duplicate));
        }
        self.refuse_compromised(b, &identity).await?;
        let state = b.prekeys.as_mut().ok_or(unaccepted(Error::UnknownPrekey))?;
        let accepted = Session::accept(
            &self.identity.keys,
            &state.prekeys,
            incoming,
            self.config.session,
        )
        .map_err(unaccepted)?;
        let frame = Frame::decode(accepted.plaintext).map_err(|_| Rejection::BadFrame)?;
        let address = DeviceAddress {
            identity,
            device_id: frame.device_id,
        };
        if let Some(id) = accepted.consumed_one_time_prekey {
            state.prekeys.remove_one_time_prekey(id);
        }
        state.accepted.push((fields.signed_prekey_id, digest));
        b.prekeys_changed = true;
        let mut entry = SessionEntry::new(accepted.session, frame.generation.unwrap_or(0), now);
        entry.last_received = now;
        entry.reset = frame.reset;
        let id = entry.id;
        let me = self.address();
        let record = b.records.entry(address).or_default();
        record.insert(entry, self.config.archived_sessions, &me, &address);
        if frame.reset {
            record.apply_reset(&id, &me, &address);
            b.urgent.insert(address);
        }
        b.touch(address);
        Ok((address, frame))
    }

    /// Refuses a compromised key; a store failure aborts the batch (it is
    /// kept in `b.failed` and returned by [`Client::process_batch`]).
    async fn refuse_compromised(
        &self,
        b: &mut Batch,
        identity: &[u8; 32],
    ) -> Result<(), Rejection> {
        match self.peer_trust(&mut b.peers, identity).await {
            Ok(Some(Trust::Compromised)) => Err(Rejection::Compromised),
            Ok(_) => Ok(()),
            // Its trust cannot be read: refused (fail closed), and the
            // batch goes on for everyone else.
            Err(StoreError::Corrupted { .. }) => Err(Rejection::Unverified),
            Err(e) => {
                b.failed = Some(e);
                Err(Rejection::NoSession)
            }
        }
    }

    /// An identity key's trust (`None`: never seen), read from the store
    /// once per batch: peer records do not change while a batch is
    /// processed (new peers are committed with it).
    async fn peer_trust(
        &self,
        cache: &mut PeerCache,
        identity: &[u8; 32],
    ) -> Result<Option<Trust>, StoreError> {
        if let Some(trust) = cache.get(identity) {
            return Ok(*trust);
        }
        let trust = fold_trust(&self.store.peers_with_identity(identity).await?);
        cache.insert(*identity, trust);
        Ok(trust)
    }
}

/// Whether a session of `record` that awaits a new chain decrypts
/// `message` (tried on a copy of the session: nothing changes).
fn opens_new_chain(record: &SessionRecord, message: &Incoming<'_>) -> bool {
    let mut scratch = Vec::new();
    record.entries().iter().any(|e| {
        e.session.awaits_new_ratchet_key() && {
            let ok = e
                .session
                .clone()
                .decrypt_incoming(message, &mut scratch)
                .is_ok();
            scratch.zeroize();
            ok
        }
    })
}

/// Decrypts `message` with the first session of `record` that awaits a new
/// chain and opens it; returns that entry's index. Decryption is staged, so
/// the sessions that fail are unchanged.
fn decrypt_new_chain(
    record: &mut SessionRecord,
    message: &Incoming<'_>,
    plaintext: &mut Vec<u8>,
) -> Option<usize> {
    record
        .entries_mut()
        .iter_mut()
        .enumerate()
        .filter(|(_, e)| e.session.awaits_new_ratchet_key())
        .find_map(|(i, e)| {
            e.session
                .decrypt_incoming(message, plaintext)
                .ok()
                .map(|()| i)
        })
}

/// Messages the ratchet counters of a peer's sessions show were sent but
/// have not arrived (each session's skipped message keys).
fn gaps(record: &SessionRecord) -> usize {
    record
        .entries()
        .iter()
        .map(|e| e.session.skipped_message_keys())
        .sum()
}

/// Runs a future to completion on the current thread, parking it while the
/// future waits. For synchronous programs, examples and tests; applications
/// with an async runtime await the client's futures there instead.
pub fn block_on<F: core::future::Future>(future: F) -> F::Output {
    use std::sync::Arc;
    use std::task::{Context, Poll, Wake, Waker};
    use std::thread::{self, Thread};

    struct Unpark(Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut future = core::pin::pin!(future);
    loop {
        match future.as_mut().poll(&mut cx) {
            Poll::Ready(output) => return output,
            Poll::Pending => thread::park(),
        }
    }
}

/// What a payload is, by its first two bytes (SPEC.md 26.4).
#[derive(Clone, Copy, PartialEq, Eq)]
enum PayloadKind {
    /// Anything that is not v2: decoded as a v1 wire message.
    V1,
    /// A v2 sealed prekey message.
    SealedPrekey,
    /// A v2 chain message.
    Chain,
    /// Any other payload beginning with the v2 version byte (an inner
    /// prekey message outside its seal included): refused.
    OtherV2,
}

fn payload_kind(payload: &[u8]) -> PayloadKind {
    match payload {
        [sealed::VERSION_2, sealed::KIND_SEALED_PREKEY, ..] => PayloadKind::SealedPrekey,
        [sealed::VERSION_2, sealed::KIND_CHAIN, ..] => PayloadKind::Chain,
        [sealed::VERSION_2, ..] => PayloadKind::OtherV2,
        _ => PayloadKind::V1,
    }
}

/// The device number of every private inbox (SPEC.md 26.11): the same for
/// all, so it tells nothing.
pub const INBOX_DEVICE_ID: u32 = 0;

const INBOX_INFO: &[u8] = b"cubbyhole/v2 inbox";

/// A mailbox owner: the keys that sign its proofs and its address.
struct Owner<'a> {
    keys: &'a IdentityKeyPair,
    address: DeviceAddress,
}

/// A device's private inbox for one access-key epoch (SPEC.md 26.11): a
/// pseudonymous identity and its own access key, derived from the device's
/// identity seed, `okm = HKDF-SHA-256(salt 0^32, ikm = identity seed, info
/// = "cubbyhole/v2 inbox" || epoch (4), 48)`: the identity's seed is
/// `okm[..32]`, the inbox access key `okm[32..48]`; device number
/// [`INBOX_DEVICE_ID`]. Nobody without the seed can link either to the
/// device, and the inbox key is unrelated to the access key that deposits
/// into the published mailbox show.
struct Inbox {
    keys: IdentityKeyPair,
    address: DeviceAddress,
    key: AccessKey,
}

fn inbox_for(identity: &IdentityKeyPair, epoch: u32) -> Inbox {
    let mut info = [0u8; 18 + 4];
    info[..18].copy_from_slice(INBOX_INFO);
    info[18..].copy_from_slice(&epoch.to_be_bytes());
    let okm = crate::protocol::ratchet::hkdf::<48>(&[0u8; 32], &identity.seed()[..], &info);
    let mut seed = Zeroizing::new([0u8; 32]);
    crate::protocol::ratchet::copy(seed.as_mut(), okm.iter().copied());
    let mut key = Zeroizing::new([0u8; 16]);
    crate::protocol::ratchet::copy(key.as_mut(), okm.iter().copied().skip(32));
    let keys = IdentityKeyPair::from_seed(&seed);
    let address = DeviceAddress::new(keys.public(), INBOX_DEVICE_ID);
    Inbox {
        keys,
        address,
        key: AccessKey::from_bytes(*key),
    }
}
