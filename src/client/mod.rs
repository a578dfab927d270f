//! The high-level client: a local [`Store`] joined to an untrusted
//! [`PrekeyDirectory`] and [`Mailbox`].
//!
//! It publishes and maintains prekeys (signed-prekey rotation with a grace
//! period, one-time-prekey refill), sends bytes to peer devices (fetching
//! and verifying a bundle when there is no session yet), and receives
//! everything pending with exactly-once delivery into the store's inbox:
//!
//! - **send**: encrypt, commit the new session state *and* the envelope to
//!   the outbox in one transaction, then deposit; a failed or lost deposit
//!   is retried with the same envelope id, so it lands once;
//! - **receive**: fetch, decrypt, commit a batch (session states, consumed
//!   one-time prekeys, inbox messages and the "processed" marks of the
//!   envelopes) in one transaction, and only then acknowledge; an envelope
//!   delivered again is recognised by its mark and only acknowledged.
//!
//! A crash at any point therefore loses nothing and shows nothing twice.
//! The client reads no clock and draws no randomness of its own: `now` and
//! `rng` are arguments, as in the protocol core.
//!
//! Inside each message the client puts a small frame,
//! `0x01 || sender device id (4) || body`, so that the recipient learns the
//! sender's device number from the encrypted payload, not from anything the
//! relay sees. The envelope carries no sender: a message is routed to its
//! session by the ratchet key in its header (or, for a new chain, by trying
//! the sessions that await one), and a prekey message by its IK_A and EK_A.

use std::collections::HashMap;
use std::fmt;
use std::vec::Vec;

use rand_core::CryptoRngCore;

use crate::error::Error;
use crate::protocol::bundle::{FreshnessPolicy, PrekeyBundle};
use crate::protocol::fingerprint::SafetyNumber;
use crate::protocol::keys::{IdentityKey, IdentityKeyPair};
use crate::protocol::prekeys::PrekeyStore;
use crate::protocol::ratchet::SessionConfig;
use crate::protocol::session::Session;
use crate::protocol::wire::Incoming;
use crate::storage::{
    InboxMessage, LocalIdentity, OutboxEntry, PeerRecord, PrekeyState, ReceiveCommit, Store,
    StoreError, Trust,
};
use crate::transport::{
    BundleSetUpload, DeviceAddress, Envelope, EnvelopeId, Mailbox, MailboxAuth, MailboxOp,
    PrekeyDirectory, TransportError,
};

const FRAME_VERSION: u8 = 0x01;
const FRAME_HEADER: usize = 5;

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
    /// How long "processed" marks are kept (default 60 days, twice the
    /// relay's retention).
    pub processed_retention: u64,
    /// The longest body [`Client::send`] accepts (default 256 KiB minus 256
    /// bytes, so that the envelope fits the relay's default 256 KiB).
    pub max_body: usize,
    /// Fetch rounds one [`Client::receive`] makes at most (default 100): a
    /// relay that keeps serving envelopes cannot hold the client forever.
    pub max_receive_rounds: u32,
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
    /// The peer is marked compromised.
    Compromised,
    /// The body is too long for one message.
    TooLong,
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Protocol(e) => write!(f, "protocol: {e}"),
            ClientError::Store(e) => write!(f, "store: {e}"),
            ClientError::Transport(e) => write!(f, "transport: {e}"),
            ClientError::WrongIdentity => {
                f.write_str("the directory served a bundle of another identity")
            }
            ClientError::Compromised => f.write_str("the peer is marked compromised"),
            ClientError::TooLong => f.write_str("message body too long"),
        }
    }
}

impl std::error::Error for ClientError {}

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
    /// Envelopes rejected (undecryptable, replayed, forged, from a
    /// compromised peer), with the reason; they are acknowledged (they can
    /// never decrypt) and dropped.
    pub rejected: Vec<(EnvelopeId, Rejection)>,
    /// Gaps: per peer device, how many messages the ratchet counters show
    /// were sent but have not arrived (dropped or withheld by the relay).
    pub missing: Vec<(DeviceAddress, usize)>,
}

/// Why an envelope was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// The protocol refused it (duplicate, forgery, ...).
    Protocol(Error),
    /// No session could take it.
    NoSession,
    /// Its plaintext is not a valid client frame.
    BadFrame,
    /// The sender is marked compromised.
    Compromised,
}

/// A device: its store and its view of the untrusted directory and mailbox.
pub struct Client<S, D, M> {
    store: S,
    directory: D,
    mailbox: M,
    config: ClientConfig,
    identity: LocalIdentity,
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

impl<S: Store, D: PrekeyDirectory, M: Mailbox> Client<S, D, M> {
    /// Opens the device stored in `store`, creating its identity (and
    /// prekeys, published by [`Client::maintain_prekeys`]) if it has none.
    ///
    /// # Errors
    /// [`ClientError::Store`].
    pub fn open(
        mut store: S,
        directory: D,
        mailbox: M,
        config: ClientConfig,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Self, ClientError> {
        let identity = match store.identity()? {
            Some(identity) => identity,
            None => {
                let identity = LocalIdentity {
                    keys: IdentityKeyPair::generate(rng),
                    device_id: config.device_id,
                };
                store.set_identity(&identity)?;
                identity
            }
        };
        Ok(Client {
            store,
            directory,
            mailbox,
            config,
            identity,
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

    /// The safety number to compare with a peer out of band.
    ///
    /// # Errors
    /// [`ClientError::Protocol`] if the address holds an invalid key.
    pub fn safety_number(&self, peer: &DeviceAddress) -> Result<SafetyNumber, ClientError> {
        let theirs = IdentityKey::from_bytes(&peer.identity)?;
        Ok(SafetyNumber::new(self.identity.keys.public(), &theirs))
    }

    /// Records the result of comparing safety numbers (or a compromise).
    ///
    /// # Errors
    /// [`ClientError::Store`].
    pub fn set_trust(
        &mut self,
        peer: &DeviceAddress,
        trust: Trust,
        now: u64,
    ) -> Result<(), ClientError> {
        let first_seen = self.store.peer(peer)?.map_or(now, |p| p.first_seen);
        self.store.set_peer(&PeerRecord {
            address: *peer,
            trust,
            first_seen,
        })?;
        Ok(())
    }

    /// The local store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Consumes the client, returning its store (to close it).
    pub fn into_store(self) -> S {
        self.store
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
    pub async fn maintain_prekeys(
        &mut self,
        rng: &mut (impl CryptoRngCore + Send),
        now: u64,
    ) -> Result<bool, ClientError> {
        let me = self.address();
        let keys = &self.identity.keys;
        let mut state = match self.store.prekeys()? {
            Some(state) => state,
            None => PrekeyState {
                prekeys: PrekeyStore::new(rng, keys, now),
                upload_counter: 0,
                last_rotation: now,
                retired_at: Vec::new(),
                one_time_retired: Vec::new(),
                upload_pending: true,
            },
        };
        let mut changed = false;
        let mut replace = state.upload_pending;
        if now.saturating_sub(state.last_rotation) >= self.config.signed_prekey_rotation {
            let old = state.prekeys.current_signed_prekey().id();
            state.prekeys.rotate_signed_prekey(rng, keys, now);
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
                self.store.set_prekeys(&state)?;
            }
            return Ok(false);
        }
        state.prekeys.generate_one_time_prekeys(rng, add);
        // Committed before the upload: the counter is never reused, and a
        // failed upload is redone (with fresh keys) by the next call.
        state.upload_counter = state.upload_counter.max(now).saturating_add(1);
        state.upload_pending = true;
        self.store.set_prekeys(&state)?;
        let one_time: Vec<_> = state
            .prekeys
            .one_time_prekeys()
            .filter(|k| k.id() >= first_new)
            .collect();
        let upload = BundleSetUpload::new(
            self.identity.device_id,
            keys,
            state.upload_counter,
            state.prekeys.current_signed_prekey(),
            &one_time,
            replace,
        )
        .sign(keys);
        self.directory.publish(&upload).await?;
        state.upload_pending = false;
        self.store.set_prekeys(&state)?;
        Ok(true)
    }

    fn check_trust(&self, peer: &DeviceAddress) -> Result<Option<PeerRecord>, ClientError> {
        let record = self.store.peer(peer)?;
        if record
            .as_ref()
            .is_some_and(|r| r.trust == Trust::Compromised)
        {
            return Err(ClientError::Compromised);
        }
        Ok(record)
    }

    /// Sends `body` to a peer device: encrypts it (starting a session from
    /// a fetched, verified bundle if there is none), commits the session and
    /// the envelope to the outbox, and deposits it.
    ///
    /// # Errors
    /// [`ClientError::WrongIdentity`] for a substituted bundle,
    /// [`ClientError::Protocol`] for a forged ([`Error::Signature`]) or stale
    /// ([`Error::StaleBundle`]) one, [`ClientError::Compromised`],
    /// [`ClientError::Store`], [`ClientError::Transport`] if the bundle
    /// cannot be fetched. A failed *deposit* is not an error: see [`Sent`].
    pub async fn send(
        &mut self,
        rng: &mut (impl CryptoRngCore + Send),
        to: &DeviceAddress,
        body: &[u8],
        now: u64,
    ) -> Result<Sent, ClientError> {
        if body.len() > self.config.max_body {
            return Err(ClientError::TooLong);
        }
        let record = self.check_trust(to)?;
        let mut session = match self.store.session(to)? {
            Some(session) => session,
            None => {
                let bytes = self.directory.fetch_bundle(to).await?;
                let bundle = PrekeyBundle::decode(&bytes)?;
                if bundle.identity().as_bytes() != &to.identity {
                    return Err(ClientError::WrongIdentity);
                }
                let bundle = bundle.verify(now, self.config.freshness)?;
                Session::initiate(rng, &self.identity.keys, &bundle, self.config.session)?
            }
        };
        let mut frame = Vec::with_capacity(FRAME_HEADER + body.len());
        frame.push(FRAME_VERSION);
        frame.extend_from_slice(&self.identity.device_id.to_be_bytes());
        frame.extend_from_slice(body);
        let payload = session.encrypt(rng, &frame).map_err(|e| match e {
            Error::PlaintextTooLong => ClientError::TooLong,
            e => ClientError::Protocol(e),
        })?;
        let mut id = [0u8; 16];
        rng.fill_bytes(&mut id);
        let entry = OutboxEntry {
            to: *to,
            envelope: Envelope {
                id: EnvelopeId(id),
                payload,
            },
            created: now,
        };
        if record.is_none() {
            self.store.set_peer(&PeerRecord {
                address: *to,
                trust: Trust::Unvalidated,
                first_seen: now,
            })?;
        }
        self.store.commit_send(&session, &entry)?;
        let deposited = self.deposit(&entry).await?;
        Ok(Sent {
            id: entry.envelope.id,
            deposited,
        })
    }

    /// Deposits with retries; removes the entry from the outbox on success.
    async fn deposit(&mut self, entry: &OutboxEntry) -> Result<bool, ClientError> {
        let mailbox = entry.to.mailbox();
        for _ in 0..self.config.deposit_attempts.max(1) {
            match self.mailbox.deposit(&mailbox, &entry.envelope).await {
                Ok(()) => {
                    self.store.remove_outbox(&entry.envelope.id)?;
                    return Ok(true);
                }
                Err(TransportError::Unavailable(_)) => continue,
                // Never deliverable: drop it from the outbox (the receiver's
                // counters will show it as missing) and say so.
                Err(e @ TransportError::LimitExceeded(crate::relay::reason::ENVELOPE_SIZE))
                | Err(e @ TransportError::BadRequest(_)) => {
                    self.store.remove_outbox(&entry.envelope.id)?;
                    return Err(e.into());
                }
                // Refused for now (mailbox full, rate limited): keep it
                // queued for a later flush and tell the caller.
                Err(_) => return Ok(false),
            }
        }
        Ok(false)
    }

    /// Deposits every envelope left in the outbox (after a crash or a failed
    /// deposit), with the same ids. Returns how many were deposited.
    ///
    /// # Errors
    /// [`ClientError::Store`].
    pub async fn flush_outbox(&mut self) -> Result<usize, ClientError> {
        let mut done = 0;
        for entry in self.store.outbox()? {
            if self.deposit(&entry).await? {
                done += 1;
            }
        }
        Ok(done)
    }

    async fn auth(&self, op: MailboxOp) -> Result<MailboxAuth, ClientError> {
        let challenge = self.mailbox.challenge(&self.address().mailbox()).await?;
        Ok(MailboxAuth::sign(
            &self.identity.keys,
            self.identity.device_id,
            op,
            challenge,
        ))
    }

    /// Receives everything pending: fetches envelopes in batches, decrypts,
    /// commits each batch atomically to the store (sessions, consumed
    /// one-time prekeys, inbox messages, processed marks), then acknowledges
    /// it. Messages appear in the store's inbox ([`Client::inbox`]).
    ///
    /// # Errors
    /// [`ClientError::Store`], [`ClientError::Transport`]. Nothing is
    /// acknowledged that was not committed first.
    pub async fn receive(&mut self, now: u64) -> Result<ReceiveReport, ClientError> {
        self.receive_waiting(now, 0).await
    }

    /// [`Client::receive`], but when nothing is pending the first fetch waits
    /// up to `wait_ms` milliseconds for an envelope (a long poll, if the
    /// mailbox supports it), so an online device gets messages as they
    /// arrive without polling in a loop.
    ///
    /// # Errors
    /// As [`Client::receive`].
    pub async fn receive_waiting(
        &mut self,
        now: u64,
        wait_ms: u32,
    ) -> Result<ReceiveReport, ClientError> {
        let mut report = ReceiveReport::default();
        let mut wait_ms = wait_ms;
        for _ in 0..self.config.max_receive_rounds.max(1) {
            let auth = self.auth(MailboxOp::Fetch).await?;
            let envelopes = self
                .mailbox
                .fetch_waiting(&auth, self.config.receive_batch, wait_ms)
                .await?;
            wait_ms = 0;
            if envelopes.is_empty() {
                break;
            }
            let redelivered_before = report.redelivered;
            let ids = self.process_batch(&envelopes, now, &mut report)?;
            let auth = self.auth(MailboxOp::Acknowledge).await?;
            self.mailbox.acknowledge(&auth, &ids).await?;
            // Fetch until the mailbox is empty (a batch may be cut short by
            // the relay's byte limit), but stop if a batch held nothing new.
            if report.redelivered - redelivered_before == envelopes.len() {
                break;
            }
        }
        let cutoff = now.saturating_sub(self.config.processed_retention);
        self.store.prune_processed(cutoff)?;
        report.missing = self.missing()?;
        Ok(report)
    }

    /// Per peer device, how many messages the ratchet counters show were
    /// sent but have not arrived (up to the skipped-key cap).
    ///
    /// # Errors
    /// [`ClientError::Store`].
    pub fn missing(&self) -> Result<Vec<(DeviceAddress, usize)>, ClientError> {
        Ok(self
            .store
            .sessions()?
            .into_iter()
            .filter_map(|(a, s)| {
                let n = s.skipped_message_keys();
                (n > 0).then_some((a, n))
            })
            .collect())
    }

    /// Messages received and not yet taken by the application, in order.
    ///
    /// # Errors
    /// [`ClientError::Store`].
    pub fn inbox(&self) -> Result<Vec<InboxMessage>, ClientError> {
        Ok(self.store.inbox()?)
    }

    /// Removes a message the application has shown or saved.
    ///
    /// # Errors
    /// [`ClientError::Store`].
    pub fn remove_from_inbox(&mut self, id: &EnvelopeId) -> Result<(), ClientError> {
        Ok(self.store.remove_inbox(id)?)
    }

    /// Decrypts a fetched batch against working copies of the sessions and
    /// prekeys, commits it in one transaction, and returns the ids to
    /// acknowledge.
    fn process_batch(
        &mut self,
        envelopes: &[Envelope],
        now: u64,
        report: &mut ReceiveReport,
    ) -> Result<Vec<EnvelopeId>, ClientError> {
        let mut sessions: HashMap<DeviceAddress, Session> =
            self.store.sessions()?.into_iter().collect();
        let mut prekeys = self.store.prekeys()?;
        let mut prekeys_changed = false;
        let mut touched: Vec<DeviceAddress> = Vec::new();
        let mut new_peers: Vec<PeerRecord> = Vec::new();
        let mut messages: Vec<InboxMessage> = Vec::new();
        let mut processed: Vec<EnvelopeId> = Vec::new();
        let mut seen_in_batch = std::collections::HashSet::new();
        let mut known_peers = PeerCache::new();
        let mut ack = Vec::with_capacity(envelopes.len());

        for envelope in envelopes {
            ack.push(envelope.id);
            if !seen_in_batch.insert(envelope.id) || self.store.is_processed(&envelope.id)? {
                report.redelivered += 1;
                continue;
            }
            processed.push(envelope.id);
            match self.open_envelope(
                envelope,
                &mut sessions,
                &mut prekeys,
                &mut prekeys_changed,
                &mut touched,
                &mut known_peers,
            ) {
                Ok((from, body)) => {
                    if self.peer_trust(&mut known_peers, &from)?.is_none()
                        && !new_peers.iter().any(|p| p.address == from)
                    {
                        new_peers.push(PeerRecord {
                            address: from,
                            trust: Trust::Unvalidated,
                            first_seen: now,
                        });
                    }
                    messages.push(InboxMessage {
                        envelope_id: envelope.id,
                        from,
                        body,
                        received_at: now,
                    });
                    report.received += 1;
                }
                Err(why) => report.rejected.push((envelope.id, why)),
            }
        }

        // One transaction for the whole batch: every envelope's mark and
        // message, then each touched session's final state, the prekeys if
        // a one-time prekey was consumed, and new peers.
        let mut commits: Vec<ReceiveCommit<'_>> =
            Vec::with_capacity(processed.len() + touched.len() + 1);
        let mut messages_iter = messages.iter().peekable();
        for id in &processed {
            let message = match messages_iter.peek() {
                Some(m) if &m.envelope_id == id => messages_iter.next(),
                _ => None,
            };
            commits.push(ReceiveCommit {
                envelope_id: *id,
                processed_at: now,
                session: None,
                prekeys: None,
                peer: None,
                message,
            });
        }
        let last = processed.last().copied();
        if let Some(last) = last {
            for address in &touched {
                if let Some(session) = sessions.get(address) {
                    commits.push(ReceiveCommit {
                        envelope_id: last,
                        processed_at: now,
                        session: Some((address, session)),
                        prekeys: None,
                        peer: None,
                        message: None,
                    });
                }
            }
            for peer in &new_peers {
                commits.push(ReceiveCommit {
                    envelope_id: last,
                    processed_at: now,
                    session: None,
                    prekeys: None,
                    peer: Some(peer),
                    message: None,
                });
            }
            if prekeys_changed {
                commits.push(ReceiveCommit {
                    envelope_id: last,
                    processed_at: now,
                    session: None,
                    prekeys: prekeys.as_ref(),
                    peer: None,
                    message: None,
                });
            }
            self.store.commit_receive(&commits)?;
        }
        Ok(ack)
    }

    /// Routes and decrypts one envelope against the working copies; records
    /// every session it advanced in `touched`.
    fn open_envelope(
        &self,
        envelope: &Envelope,
        sessions: &mut HashMap<DeviceAddress, Session>,
        prekeys: &mut Option<PrekeyState>,
        prekeys_changed: &mut bool,
        touched: &mut Vec<DeviceAddress>,
        known_peers: &mut PeerCache,
    ) -> Result<(DeviceAddress, Vec<u8>), Rejection> {
        let incoming = Incoming::decode(&envelope.payload).map_err(Rejection::Protocol)?;
        let mut plaintext = Vec::new();
        // The session the message belongs to: by IK_A and EK_A for a prekey
        // message, by the header's ratchet key otherwise.
        let existing = match incoming.prekey() {
            Some(fields) => sessions
                .iter()
                .find(|(a, s)| a.identity == fields.identity && s.matches(&incoming))
                .map(|(a, _)| *a),
            None => {
                let key = &incoming.header().ratchet_key;
                sessions
                    .iter()
                    .find(|(_, s)| s.receiving_ratchet_keys().any(|k| k == key))
                    .map(|(a, _)| *a)
            }
        };
        let address = match existing {
            Some(address) => {
                let session = sessions.get_mut(&address).ok_or(Rejection::NoSession)?;
                session
                    .decrypt_incoming(&incoming, &mut plaintext)
                    .map_err(Rejection::Protocol)?;
                address
            }
            None if incoming.prekey().is_some() => {
                // A new session. Nothing is consumed or stored unless the
                // message decrypts, frames correctly and the peer is trusted.
                let state = prekeys
                    .as_mut()
                    .ok_or(Rejection::Protocol(Error::UnknownPrekey))?;
                let accepted = Session::accept(
                    &self.identity.keys,
                    &state.prekeys,
                    &incoming,
                    self.config.session,
                )
                .map_err(Rejection::Protocol)?;
                let (device_id, body) = parse_frame(accepted.plaintext)?;
                let address = DeviceAddress {
                    identity: *accepted.session.remote_identity().as_bytes(),
                    device_id,
                };
                self.check_sender(known_peers, &address)?;
                if let Some(id) = accepted.consumed_one_time_prekey {
                    state.prekeys.remove_one_time_prekey(id);
                    *prekeys_changed = true;
                }
                // The newest session with a device replaces an older one.
                sessions.insert(address, accepted.session);
                if !touched.contains(&address) {
                    touched.push(address);
                }
                return Ok((address, body));
            }
            None => {
                // A new chain: only a session that awaits one can own it.
                // Decryption is staged, so a wrong try changes nothing.
                sessions
                    .iter_mut()
                    .filter(|(_, s)| s.awaits_new_ratchet_key())
                    .find_map(|(a, s)| {
                        s.decrypt_incoming(&incoming, &mut plaintext)
                            .ok()
                            .map(|()| *a)
                    })
                    .ok_or(Rejection::NoSession)?
            }
        };
        if !touched.contains(&address) {
            touched.push(address);
        }
        let (device_id, body) = parse_frame(plaintext)?;
        if device_id != address.device_id {
            return Err(Rejection::BadFrame);
        }
        self.check_sender(known_peers, &address)?;
        Ok((address, body))
    }

    fn check_sender(
        &self,
        known_peers: &mut PeerCache,
        address: &DeviceAddress,
    ) -> Result<(), Rejection> {
        match self.peer_trust(known_peers, address) {
            Ok(Some(Trust::Compromised)) => Err(Rejection::Compromised),
            _ => Ok(()),
        }
    }

    /// The peer's trust (`None`: not a known peer), read from the store
    /// once per batch: peer records do not change while a batch is
    /// processed (new peers are committed with it).
    fn peer_trust(
        &self,
        known_peers: &mut PeerCache,
        address: &DeviceAddress,
    ) -> Result<Option<Trust>, StoreError> {
        if let Some(trust) = known_peers.get(address) {
            return Ok(*trust);
        }
        let trust = self.store.peer(address)?.map(|p| p.trust);
        known_peers.insert(*address, trust);
        Ok(trust)
    }
}

/// Peers' trust read during one batch of received envelopes.
type PeerCache = HashMap<DeviceAddress, Option<Trust>>;

/// Splits a client frame into the sender's device number and the body.
fn parse_frame(mut plaintext: Vec<u8>) -> Result<(u32, Vec<u8>), Rejection> {
    if plaintext.len() < FRAME_HEADER || plaintext[0] != FRAME_VERSION {
        return Err(Rejection::BadFrame);
    }
    let mut device = [0u8; 4];
    device.copy_from_slice(&plaintext[1..FRAME_HEADER]);
    let body = plaintext.split_off(FRAME_HEADER);
    Ok((u32::from_be_bytes(device), body))
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
