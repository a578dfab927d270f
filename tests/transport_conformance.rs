//! The `PrekeyDirectory` + `Mailbox` conformance suite
//! (`cubbyhole::transport::conformance`): the in-process relay over the
//! memory and SQLite storages passes it, and deliberately broken
//! implementations fail it, each at the check that covers its fault. (The
//! relay crate runs it against its HTTP server and client:
//! `relay/tests/transport_conformance.rs`.)

use cubbyhole::client::block_on;
use cubbyhole::relay::{
    AppendOutcome, ClaimBudget, ClaimOutcome, DeviceRecord, InProcessRelay, InsertOutcome,
    MailboxLimits, MailboxUsage, MemoryRelayStorage, Relay, RelayConfig, RelayKey, RelayStorage,
    RelayStorageError, Share, StoredDeviceList, UploadOutcome,
};
use cubbyhole::transport::conformance::{self, Options, Violation, CHECKS};
use cubbyhole::transport::DepositPass;
use cubbyhole::transport::{
    BundleSetUpload, DeviceAddress, DeviceDirectory, Envelope, EnvelopeId, Mailbox, MailboxAuth,
    MailboxId, PrekeyDirectory, TransportError,
};

fn in_process<S: RelayStorage + Send>(storage: S) -> (InProcessRelay<S>, InProcessRelay<S>) {
    let relay = InProcessRelay::new(Relay::new(storage, RelayConfig::unpriced()));
    (relay.clone(), relay)
}

#[test]
fn the_in_process_relay_over_memory_conforms() {
    conformance::run(
        || in_process(MemoryRelayStorage::new()),
        &Options::default(),
    );
}

#[cfg(feature = "sqlite")]
#[test]
fn the_in_process_relay_over_sqlite_conforms() {
    use cubbyhole::relay::SqliteRelayStorage;
    conformance::run(
        || in_process(SqliteRelayStorage::open_in_memory().unwrap()),
        &Options::default(),
    );
}

#[test]
fn every_check_has_a_distinct_name_and_runs_alone() {
    let mut names: Vec<&str> = CHECKS.iter().map(|c| c.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), CHECKS.len(), "duplicate check names");
    let options = Options::default();
    for check in CHECKS {
        let (d, m) = in_process(MemoryRelayStorage::new());
        block_on(check.run(&d, &m, &options)).unwrap();
    }
    let (d, m) = in_process(MemoryRelayStorage::new());
    block_on(conformance::check_fetch_order(&d, &m, &options)).unwrap();
}

#[test]
fn a_smaller_envelope_bound_is_checked_as_configured() {
    let config = RelayConfig {
        max_envelope_bytes: 1_000,
        ..RelayConfig::unpriced()
    };
    let make = || {
        let relay = InProcessRelay::new(Relay::new(MemoryRelayStorage::new(), config.clone()));
        (relay.clone(), relay)
    };
    let small = Options {
        max_envelope_bytes: 1_000,
        ..Options::default()
    };
    conformance::run(make, &small);
    // Expecting the default bound from a relay with a smaller one fails.
    let violations = conformance::try_run(make, &Options::default()).unwrap_err();
    let names: Vec<&str> = violations.iter().map(|v| v.check).collect();
    assert_eq!(names, ["bounds"], "{}", conformance::report(&violations));
}

// ------------------------------------------------- broken implementations

/// What a broken implementation gets wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// None: the wrappers are faithful.
    None,
    // In the storage under the relay:
    /// A deposit of a pending id is stored again (under another id).
    DepositNotIdempotent,
    /// Fetches return the newest envelope first.
    FetchNewestFirst,
    /// Fetches return every envelope, whatever the limit.
    FetchIgnoresLimit,
    /// A challenge is not deleted when used.
    ChallengeReusable,
    /// A claimed one-time prekey stays in the pool.
    PrekeyHandedOutTwice,
    /// An upload with the last accepted counter is applied.
    ReplayedPublishAccepted,
    /// Acknowledging deletes every envelope of the mailbox.
    AcknowledgeDeletesAll,
    // In front of the relay:
    /// A publish whose signature fails is answered `Ok` (and ignored).
    SignatureUnchecked,
    /// A fetch or acknowledgment with a bad proof is answered with nothing
    /// instead of `Unauthorized`.
    ProofUnchecked,
    /// An oversized envelope is answered `Ok` (and dropped).
    SizeBoundSilent,
    /// An unknown device gets an empty bundle.
    UnknownDeviceEmpty,
    /// Claims to long-poll but answers at once.
    DoesNotWait,
}

/// The memory storage with the storage faults.
struct BrokenStorage {
    inner: MemoryRelayStorage,
    fault: Fault,
}

impl RelayStorage for BrokenStorage {
    fn device_list_head(
        &self,
        account: &cubbyhole::AccountId,
    ) -> Result<Option<StoredDeviceList>, RelayStorageError> {
        self.inner.device_list_head(account)
    }
    fn device_list_version(
        &self,
        account: &cubbyhole::AccountId,
        version: u64,
    ) -> Result<Option<StoredDeviceList>, RelayStorageError> {
        self.inner.device_list_version(account, version)
    }
    fn device_lists_after(
        &self,
        account: &cubbyhole::AccountId,
        after: u64,
        limit: u32,
    ) -> Result<Vec<StoredDeviceList>, RelayStorageError> {
        self.inner.device_lists_after(account, after, limit)
    }
    fn append_device_list(
        &mut self,
        account: &cubbyhole::AccountId,
        list: &StoredDeviceList,
        previous: &[u8; 32],
        retain: u32,
    ) -> Result<AppendOutcome, RelayStorageError> {
        self.inner
            .append_device_list(account, list, previous, retain)
    }
    fn device(&self, device: &DeviceAddress) -> Result<Option<DeviceRecord>, RelayStorageError> {
        self.inner.device(device)
    }
    fn mailbox_exists(&self, mailbox: &MailboxId) -> Result<bool, RelayStorageError> {
        self.inner.mailbox_exists(mailbox)
    }
    fn mailbox_owner(
        &self,
        mailbox: &MailboxId,
    ) -> Result<Option<DeviceRecord>, RelayStorageError> {
        self.inner.mailbox_owner(mailbox)
    }
    fn expire_inactive(
        &mut self,
        seen_before: u64,
        received_before: u64,
    ) -> Result<u64, RelayStorageError> {
        self.inner.expire_inactive(seen_before, received_before)
    }
    fn expire_devices(&mut self, seen_before: u64) -> Result<u64, RelayStorageError> {
        self.inner.expire_devices(seen_before)
    }
    fn apply_upload(
        &mut self,
        upload: &BundleSetUpload,
        published_at: u64,
        max_one_time_prekeys: u32,
    ) -> Result<UploadOutcome, RelayStorageError> {
        let stored = self.inner.device(&upload.device)?;
        if self.fault == Fault::ReplayedPublishAccepted
            && stored.is_some_and(|r| r.counter == upload.counter)
        {
            let mut next = upload.clone();
            next.counter += 1;
            return self
                .inner
                .apply_upload(&next, published_at, max_one_time_prekeys);
        }
        self.inner
            .apply_upload(upload, published_at, max_one_time_prekeys)
    }
    fn claim_one_time_prekey(
        &mut self,
        device: &DeviceAddress,
        budget: Option<ClaimBudget>,
    ) -> Result<ClaimOutcome, RelayStorageError> {
        if self.fault == Fault::PrekeyHandedOutTwice {
            return self.inner.clone().claim_one_time_prekey(device, budget);
        }
        self.inner.claim_one_time_prekey(device, budget)
    }
    fn one_time_prekey_count(&self, device: &DeviceAddress) -> Result<u32, RelayStorageError> {
        self.inner.one_time_prekey_count(device)
    }
    fn insert_envelope(
        &mut self,
        mailbox: &MailboxId,
        envelope: &Envelope,
        share: Share,
        received_at: u64,
        limits: MailboxLimits,
    ) -> Result<InsertOutcome, RelayStorageError> {
        let outcome = self
            .inner
            .insert_envelope(mailbox, envelope, share, received_at, limits)?;
        if self.fault == Fault::DepositNotIdempotent && outcome == InsertOutcome::Duplicate {
            let mut copy = envelope.clone();
            copy.id.0[15] ^= 0xff;
            return self
                .inner
                .insert_envelope(mailbox, &copy, share, received_at, limits);
        }
        Ok(outcome)
    }
    fn list_envelopes(
        &self,
        mailbox: &MailboxId,
        received_since: u64,
        limit: u32,
        max_bytes: u64,
    ) -> Result<Vec<Envelope>, RelayStorageError> {
        match self.fault {
            Fault::FetchNewestFirst => {
                let mut all =
                    self.inner
                        .list_envelopes(mailbox, received_since, u32::MAX, max_bytes)?;
                all.reverse();
                all.truncate(limit as usize);
                Ok(all)
            }
            Fault::FetchIgnoresLimit => {
                self.inner
                    .list_envelopes(mailbox, received_since, u32::MAX, max_bytes)
            }
            _ => self
                .inner
                .list_envelopes(mailbox, received_since, limit, max_bytes),
        }
    }
    fn mailbox_usage(&self, mailbox: &MailboxId) -> Result<MailboxUsage, RelayStorageError> {
        self.inner.mailbox_usage(mailbox)
    }
    fn acknowledge_envelopes(
        &mut self,
        mailbox: &MailboxId,
        ids: &[EnvelopeId],
    ) -> Result<u64, RelayStorageError> {
        if self.fault == Fault::AcknowledgeDeletesAll {
            let all: Vec<EnvelopeId> = self
                .inner
                .list_envelopes(mailbox, 0, u32::MAX, u64::MAX)?
                .iter()
                .map(|e| e.id)
                .collect();
            return self.inner.acknowledge_envelopes(mailbox, &all);
        }
        self.inner.acknowledge_envelopes(mailbox, ids)
    }
    fn expire_envelopes(&mut self, received_before: u64) -> Result<u64, RelayStorageError> {
        self.inner.expire_envelopes(received_before)
    }
    fn relay_key(
        &mut self,
        fresh: Option<&RelayKey>,
    ) -> Result<Option<RelayKey>, RelayStorageError> {
        self.inner.relay_key(fresh)
    }
    fn consume_challenge(
        &mut self,
        mailbox: &MailboxId,
        challenge: &[u8; 32],
        now: u64,
        expires_at: u64,
    ) -> Result<bool, RelayStorageError> {
        if self.fault == Fault::ChallengeReusable {
            return self
                .inner
                .clone()
                .consume_challenge(mailbox, challenge, now, expires_at);
        }
        self.inner
            .consume_challenge(mailbox, challenge, now, expires_at)
    }
    fn purge_challenges(&mut self, now: u64) -> Result<u64, RelayStorageError> {
        self.inner.purge_challenges(now)
    }
}

/// The in-process relay over a [`BrokenStorage`], with the faults in front.
struct Broken {
    relay: InProcessRelay<BrokenStorage>,
    fault: Fault,
}

impl Broken {
    fn new(fault: Fault) -> (Broken, Broken) {
        let storage = BrokenStorage {
            inner: MemoryRelayStorage::new(),
            fault,
        };
        let relay = InProcessRelay::new(Relay::new(storage, RelayConfig::unpriced()));
        (
            Broken {
                relay: relay.clone(),
                fault,
            },
            Broken { relay, fault },
        )
    }
}

impl PrekeyDirectory for Broken {
    async fn publish(&self, upload: &[u8]) -> Result<(), TransportError> {
        match self.relay.publish(upload).await {
            Err(TransportError::Unauthorized) if self.fault == Fault::SignatureUnchecked => Ok(()),
            other => other,
        }
    }
    async fn fetch_bundle(&self, device: &DeviceAddress) -> Result<Vec<u8>, TransportError> {
        match self.relay.fetch_bundle(device).await {
            Err(TransportError::NotFound) if self.fault == Fault::UnknownDeviceEmpty => {
                Ok(Vec::new())
            }
            other => other,
        }
    }
    async fn one_time_prekeys_left(&self, device: &DeviceAddress) -> Result<u32, TransportError> {
        match self.relay.one_time_prekeys_left(device).await {
            Err(TransportError::NotFound) if self.fault == Fault::UnknownDeviceEmpty => Ok(0),
            other => other,
        }
    }
}

impl Mailbox for Broken {
    async fn deposit(
        &self,
        to: &MailboxId,
        envelope: &Envelope,
        pass: &DepositPass,
    ) -> Result<(), TransportError> {
        match self.relay.deposit(to, envelope, pass).await {
            Err(TransportError::LimitExceeded(_)) if self.fault == Fault::SizeBoundSilent => Ok(()),
            other => other,
        }
    }
    async fn challenge(&self, mailbox: &MailboxId) -> Result<[u8; 32], TransportError> {
        self.relay.challenge(mailbox).await
    }
    async fn fetch(&self, auth: &MailboxAuth, limit: u32) -> Result<Vec<Envelope>, TransportError> {
        match self.relay.fetch(auth, limit).await {
            Err(TransportError::Unauthorized) if self.fault == Fault::ProofUnchecked => {
                Ok(Vec::new())
            }
            other => other,
        }
    }
    async fn acknowledge(
        &self,
        auth: &MailboxAuth,
        ids: &[EnvelopeId],
    ) -> Result<(), TransportError> {
        match self.relay.acknowledge(auth, ids).await {
            Err(TransportError::Unauthorized) if self.fault == Fault::ProofUnchecked => Ok(()),
            other => other,
        }
    }
}

fn failed(fault: Fault) -> Vec<Violation> {
    let options = Options {
        supports_waiting: fault == Fault::DoesNotWait,
        // Nothing waits here: a failure comes back at once.
        ..Options::default()
    };
    conformance::try_run(|| Broken::new(fault), &options)
        .err()
        .unwrap_or_default()
}

#[test]
fn the_faithful_wrappers_conform() {
    let violations = failed(Fault::None);
    assert!(
        violations.is_empty(),
        "{}",
        conformance::report(&violations)
    );
}

/// Each fault is caught by the check that covers it (and maybe others).
#[test]
fn every_fault_is_caught_by_its_check() {
    let cases = [
        (Fault::DepositNotIdempotent, "deposit_idempotent"),
        (Fault::FetchNewestFirst, "fetch_order"),
        (Fault::FetchIgnoresLimit, "fetch_order"),
        (Fault::ChallengeReusable, "challenge_single_use"),
        (Fault::PrekeyHandedOutTwice, "one_time_prekeys"),
        (Fault::ReplayedPublishAccepted, "publish_replay"),
        (Fault::AcknowledgeDeletesAll, "acknowledge"),
        (Fault::SignatureUnchecked, "publish_signature"),
        (Fault::ProofUnchecked, "proof_binding"),
        (Fault::SizeBoundSilent, "bounds"),
        (Fault::UnknownDeviceEmpty, "not_found"),
        (Fault::DoesNotWait, "fetch_waiting"),
    ];
    let mut missed = Vec::new();
    for (fault, check) in cases {
        let violations = failed(fault);
        let checks: Vec<&str> = violations.iter().map(|v| v.check).collect();
        if !checks.contains(&check) {
            missed.push(format!(
                "{fault:?}: expected {check} to fail, failed: {checks:?}"
            ));
        }
    }
    assert!(
        missed.is_empty(),
        "faults not caught:\n{}",
        missed.join("\n")
    );
}

#[test]
#[should_panic(expected = "transport conformance: challenge_single_use: ")]
fn run_panics_naming_the_check() {
    conformance::run(
        || Broken::new(Fault::ChallengeReusable),
        &Options::default(),
    );
}

// ------------------------------------------------------- device directory

#[test]
fn the_in_process_relay_over_memory_is_a_conforming_device_directory() {
    conformance::run_device_directory(|| in_process(MemoryRelayStorage::new()).0);
}

#[cfg(feature = "sqlite")]
#[test]
fn the_in_process_relay_over_sqlite_is_a_conforming_device_directory() {
    use cubbyhole::relay::SqliteRelayStorage;
    conformance::run_device_directory(|| {
        in_process(SqliteRelayStorage::open_in_memory().unwrap()).0
    });
}

/// What a broken device directory gets wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DirectoryFault {
    /// Stores a list the rules refused as unauthorized (as a relay that
    /// accepts a successor signed only by the device it adds would).
    StoresUnauthorized,
    /// Answers `Ok` to a conflicting list (hides the fork).
    ConflictAnsweredOk,
    /// Serves the lists newest first.
    NewestFirst,
}

struct BrokenDirectory {
    relay: InProcessRelay<MemoryRelayStorage>,
    fault: DirectoryFault,
}

impl DeviceDirectory for BrokenDirectory {
    async fn publish_device_list(&self, signed: &[u8]) -> Result<(), TransportError> {
        let result = self.relay.publish_device_list(signed).await;
        match (self.fault, &result) {
            (DirectoryFault::StoresUnauthorized, Err(TransportError::Unauthorized)) => {
                let list = cubbyhole::DeviceList::decode(signed).unwrap();
                let stored = StoredDeviceList {
                    version: list.version(),
                    body_hash: *list.body_hash(),
                    signed: signed.to_vec(),
                };
                self.relay
                    .with_relay(|r| {
                        r.storage_mut().append_device_list(
                            list.account_id(),
                            &stored,
                            list.previous(),
                            64,
                        )
                    })?
                    .unwrap();
                Ok(())
            }
            (DirectoryFault::ConflictAnsweredOk, Err(TransportError::Conflict)) => Ok(()),
            _ => result,
        }
    }
    async fn fetch_device_lists(
        &self,
        account: &cubbyhole::AccountId,
        after: u64,
    ) -> Result<Vec<Vec<u8>>, TransportError> {
        let mut lists = self.relay.fetch_device_lists(account, after).await?;
        if self.fault == DirectoryFault::NewestFirst {
            lists.reverse();
        }
        Ok(lists)
    }
}

#[test]
fn broken_device_directories_fail_their_checks() {
    for (fault, check) in [
        (DirectoryFault::StoresUnauthorized, "device_stranger"),
        (DirectoryFault::ConflictAnsweredOk, "device_conflict"),
        (DirectoryFault::NewestFirst, "device_fetch_after"),
    ] {
        let make = || BrokenDirectory {
            relay: in_process(MemoryRelayStorage::new()).0,
            fault,
        };
        let violations = block_on(conformance::check_device_directory(make)).unwrap_err();
        let names: Vec<&str> = violations.iter().map(|v| v.check).collect();
        assert!(
            names.contains(&check),
            "{fault:?}: expected {check} to fail, failed: {names:?}"
        );
        eprintln!("{fault:?}: {}", conformance::report(&violations));
    }
}
