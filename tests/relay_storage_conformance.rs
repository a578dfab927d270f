//! The `RelayStorage` conformance suite (`cubbyhole::relay::conformance`):
//! the in-memory and SQLite relay storages pass it, and deliberately broken
//! storages fail it, each at the check that covers its fault. (The relay
//! crate runs it against PostgreSQL: `relay/tests/relay_storage_conformance.rs`.)

use cubbyhole::relay::conformance::{self, Violation, CHECKS};
use cubbyhole::relay::{
    AppendOutcome, ClaimBudget, ClaimOutcome, DeviceRecord, InsertOutcome, MailboxLimits,
    MailboxUsage, MemoryRelayStorage, RelayKey, RelayStorage, RelayStorageError, StoredDeviceList,
    UploadOutcome,
};
use cubbyhole::transport::{BundleSetUpload, DeviceAddress, Envelope, EnvelopeId, MailboxId};
use cubbyhole::AccountId;

#[test]
fn the_memory_storage_conforms() {
    conformance::run(MemoryRelayStorage::new);
}

#[test]
fn every_check_has_a_distinct_name_and_runs_alone() {
    let mut names: Vec<&str> = CHECKS.iter().map(|c| c.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), CHECKS.len(), "duplicate check names");
    for check in CHECKS {
        (check.run)(&mut MemoryRelayStorage::new()).unwrap();
    }
    conformance::check_claim(&mut MemoryRelayStorage::new()).unwrap();
}

#[cfg(feature = "sqlite")]
mod sqlite {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU32, Ordering};

    use cubbyhole::relay::conformance;
    use cubbyhole::relay::SqliteRelayStorage;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "cubbyhole-relay-storage-conformance-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn the_sqlite_storage_in_memory_conforms() {
        conformance::run(|| SqliteRelayStorage::open_in_memory().unwrap());
    }

    #[test]
    fn the_sqlite_storage_on_a_file_conforms() {
        let dir = TempDir::new();
        let mut n = 0;
        conformance::run(|| {
            n += 1;
            SqliteRelayStorage::open(dir.0.join(format!("relay-{n}.db"))).unwrap()
        });
        assert_eq!(n, conformance::CHECKS.len(), "one fresh file per check");
    }
}

/// What a [`Broken`] storage gets wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// None: the wrapper is faithful.
    None,
    /// `apply_upload` accepts a counter equal to the stored one.
    ReplayEqualCounter,
    /// `apply_upload` over the bound writes the record anyway.
    BoundWritesRecord,
    /// `claim_one_time_prekey` returns the oldest key without removing it.
    ClaimKeeps,
    /// `insert_envelope` does not check for duplicates.
    InsertNotIdempotent,
    /// `insert_envelope` checks the bounds before duplicates.
    BoundsBeforeDuplicates,
    /// `insert_envelopes` checks every envelope against the state before
    /// the batch.
    BatchIgnoresEarlier,
    /// `list_envelopes` returns the newest first.
    ListNewestFirst,
    /// `list_envelopes` ignores `max_bytes`.
    ListIgnoresBytes,
    /// `acknowledge_envelopes` deletes every pending envelope of the
    /// mailbox.
    AckDeletesAll,
    /// `mailbox_usage` counts no bytes.
    UsageNoBytes,
    /// `expire_envelopes` also deletes what was received at the cutoff.
    ExpireInclusive,
    /// `consume_challenge` does not record the challenge.
    ChallengeReusable,
    /// `consume_challenge` forgets every record of the mailbox first, not
    /// only the expired ones.
    ChallengeForgetsAll,
    /// `claim_one_time_prekey` ignores the budget.
    ClaimIgnoresBudget,
    /// `relay_key` replaces the stored key with the one offered.
    KeyReplaced,
    /// `purge_challenges` is not supported.
    PurgeUnsupported,
    /// `commit_group` drops the group's writes.
    CommitDrops,
    /// Signed-prekey creation times are clamped to `i64::MAX`.
    ClampsCreated,
    /// The storages made are not empty.
    NotFresh,
    /// `append_device_list` checks only that the version is not stored
    /// yet and is above the head, not that the head is the version before
    /// with the named hash (the check a racing relay needs).
    AppendIgnoresHead,
    /// `append_device_list` overwrites a stored version (an upsert).
    AppendOverwrites,
    /// `append_device_list` keeps every version.
    RetainsAll,
}

/// The memory storage with one fault.
struct Broken {
    inner: MemoryRelayStorage,
    fault: Fault,
    /// The state at `begin_group` (for `CommitDrops`).
    group: Option<MemoryRelayStorage>,
    /// The device lists, by account and version.
    lists: std::collections::BTreeMap<(AccountId, u64), StoredDeviceList>,
    /// The relay key (for `KeyReplaced`).
    key: Option<RelayKey>,
}

impl Broken {
    fn new(fault: Fault) -> Broken {
        let mut inner = MemoryRelayStorage::new();
        if fault == Fault::NotFresh {
            let left_over = Envelope {
                id: EnvelopeId([1; 16]),
                payload: b"left over".to_vec(),
            };
            inner
                .insert_envelope(&MailboxId([0; 32]), &left_over, 1, limits::OPEN)
                .unwrap();
        }
        Broken {
            inner,
            fault,
            group: None,
            lists: std::collections::BTreeMap::new(),
            key: None,
        }
    }
    fn maker(fault: Fault) -> impl FnMut() -> Broken {
        move || Broken::new(fault)
    }
}

impl RelayStorage for Broken {
    fn device(&self, device: &DeviceAddress) -> Result<Option<DeviceRecord>, RelayStorageError> {
        let record = self.inner.device(device)?;
        if self.fault == Fault::ClampsCreated {
            return Ok(record.map(|mut r| {
                r.signed_prekey.created = r.signed_prekey.created.min(i64::MAX as u64);
                r
            }));
        }
        Ok(record)
    }
    fn mailbox_exists(&self, mailbox: &MailboxId) -> Result<bool, RelayStorageError> {
        self.inner.mailbox_exists(mailbox)
    }
    fn apply_upload(
        &mut self,
        upload: &BundleSetUpload,
        published_at: u64,
        max_one_time_prekeys: u32,
    ) -> Result<UploadOutcome, RelayStorageError> {
        let stored = self.inner.device(&upload.device)?;
        if self.fault == Fault::ReplayEqualCounter
            && stored.is_some_and(|r| r.counter == upload.counter)
        {
            // Accepted as if it were the next counter.
            let mut next = upload.clone();
            next.counter = upload.counter.wrapping_add(1);
            let outcome = self
                .inner
                .apply_upload(&next, published_at, max_one_time_prekeys)?;
            return Ok(outcome);
        }
        let outcome = self
            .inner
            .apply_upload(upload, published_at, max_one_time_prekeys)?;
        if self.fault == Fault::BoundWritesRecord && outcome == UploadOutcome::TooManyOneTimePrekeys
        {
            let mut record_only = upload.clone();
            record_only.one_time_prekeys.clear();
            record_only.replace_one_time_prekeys = false;
            self.inner
                .apply_upload(&record_only, published_at, max_one_time_prekeys)?;
        }
        Ok(outcome)
    }
    fn claim_one_time_prekey(
        &mut self,
        device: &DeviceAddress,
        budget: Option<ClaimBudget>,
    ) -> Result<ClaimOutcome, RelayStorageError> {
        if self.fault == Fault::ClaimKeeps {
            let mut copy = self.inner.clone();
            return copy.claim_one_time_prekey(device, budget);
        }
        if self.fault == Fault::ClaimIgnoresBudget {
            return self.inner.claim_one_time_prekey(device, None);
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
        received_at: u64,
        limits: MailboxLimits,
    ) -> Result<InsertOutcome, RelayStorageError> {
        match self.fault {
            Fault::InsertNotIdempotent => {
                // A duplicate goes in under another id.
                let outcome = self
                    .inner
                    .insert_envelope(mailbox, envelope, received_at, limits)?;
                if outcome == InsertOutcome::Duplicate {
                    let mut copy = envelope.clone();
                    copy.id.0[15] ^= 0xff;
                    return self
                        .inner
                        .insert_envelope(mailbox, &copy, received_at, limits);
                }
                Ok(outcome)
            }
            Fault::BoundsBeforeDuplicates => {
                let usage = self.inner.mailbox_usage(mailbox)?;
                if usage.envelopes >= u64::from(limits.max_envelopes) {
                    return Ok(InsertOutcome::TooManyEnvelopes);
                }
                self.inner
                    .insert_envelope(mailbox, envelope, received_at, limits)
            }
            _ => self
                .inner
                .insert_envelope(mailbox, envelope, received_at, limits),
        }
    }
    fn insert_envelopes(
        &mut self,
        batch: &[(MailboxId, Envelope)],
        received_at: u64,
        limits: MailboxLimits,
    ) -> Result<Vec<InsertOutcome>, RelayStorageError> {
        if self.fault == Fault::BatchIgnoresEarlier {
            let before = self.inner.clone();
            let mut outcomes = Vec::new();
            for (mailbox, envelope) in batch {
                let mut alone = before.clone();
                let outcome = alone.insert_envelope(mailbox, envelope, received_at, limits)?;
                if outcome == InsertOutcome::Stored {
                    self.inner
                        .insert_envelope(mailbox, envelope, received_at, limits::OPEN)?;
                }
                outcomes.push(outcome);
            }
            return Ok(outcomes);
        }
        batch
            .iter()
            .map(|(m, e)| self.insert_envelope(m, e, received_at, limits))
            .collect()
    }
    fn list_envelopes(
        &self,
        mailbox: &MailboxId,
        received_since: u64,
        limit: u32,
        max_bytes: u64,
    ) -> Result<Vec<Envelope>, RelayStorageError> {
        match self.fault {
            Fault::ListNewestFirst => {
                let mut all =
                    self.inner
                        .list_envelopes(mailbox, received_since, u32::MAX, u64::MAX)?;
                all.reverse();
                all.truncate(limit as usize);
                Ok(all)
            }
            Fault::ListIgnoresBytes => {
                self.inner
                    .list_envelopes(mailbox, received_since, limit, u64::MAX)
            }
            _ => self
                .inner
                .list_envelopes(mailbox, received_since, limit, max_bytes),
        }
    }
    fn mailbox_usage(&self, mailbox: &MailboxId) -> Result<MailboxUsage, RelayStorageError> {
        let usage = self.inner.mailbox_usage(mailbox)?;
        if self.fault == Fault::UsageNoBytes {
            return Ok(MailboxUsage { bytes: 0, ..usage });
        }
        Ok(usage)
    }
    fn acknowledge_envelopes(
        &mut self,
        mailbox: &MailboxId,
        ids: &[EnvelopeId],
    ) -> Result<u64, RelayStorageError> {
        if self.fault == Fault::AckDeletesAll {
            let pending = self.inner.list_envelopes(mailbox, 0, u32::MAX, u64::MAX)?;
            let all: Vec<EnvelopeId> = pending.iter().map(|e| e.id).collect();
            self.inner.acknowledge_envelopes(mailbox, &all)?;
            return Ok(all.iter().filter(|id| ids.contains(id)).count() as u64);
        }
        self.inner.acknowledge_envelopes(mailbox, ids)
    }
    fn expire_envelopes(&mut self, received_before: u64) -> Result<u64, RelayStorageError> {
        if self.fault == Fault::ExpireInclusive {
            return self
                .inner
                .expire_envelopes(received_before.saturating_add(1));
        }
        self.inner.expire_envelopes(received_before)
    }
    fn begin_group(&mut self) -> Result<(), RelayStorageError> {
        self.group = Some(self.inner.clone());
        Ok(())
    }
    fn commit_group(&mut self) -> Result<(), RelayStorageError> {
        let before = self.group.take();
        if self.fault == Fault::CommitDrops {
            if let Some(before) = before {
                self.inner = before;
            }
        }
        Ok(())
    }
    fn relay_key(
        &mut self,
        fresh: Option<&RelayKey>,
    ) -> Result<Option<RelayKey>, RelayStorageError> {
        if self.fault == Fault::KeyReplaced {
            if let Some(fresh) = fresh {
                self.key = Some(fresh.clone());
            }
            return Ok(self.key.clone());
        }
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
            let mut copy = self.inner.clone();
            return copy.consume_challenge(mailbox, challenge, now, expires_at);
        }
        if self.fault == Fault::ChallengeForgetsAll {
            // Records of every mailbox go: a coarse stand-in.
            self.inner.purge_challenges(u64::MAX)?;
        }
        self.inner
            .consume_challenge(mailbox, challenge, now, expires_at)
    }
    fn device_list_head(
        &self,
        account: &AccountId,
    ) -> Result<Option<StoredDeviceList>, RelayStorageError> {
        Ok(self
            .lists
            .range((*account, 0)..=(*account, u64::MAX))
            .next_back()
            .map(|(_, l)| l.clone()))
    }
    fn device_list_version(
        &self,
        account: &AccountId,
        version: u64,
    ) -> Result<Option<StoredDeviceList>, RelayStorageError> {
        Ok(self.lists.get(&(*account, version)).cloned())
    }
    fn device_lists_after(
        &self,
        account: &AccountId,
        after: u64,
        limit: u32,
    ) -> Result<Vec<StoredDeviceList>, RelayStorageError> {
        if after == u64::MAX {
            return Ok(Vec::new());
        }
        Ok(self
            .lists
            .range((*account, after + 1)..=(*account, u64::MAX))
            .take(limit as usize)
            .map(|(_, l)| l.clone())
            .collect())
    }
    fn append_device_list(
        &mut self,
        account: &AccountId,
        list: &StoredDeviceList,
        previous: &[u8; 32],
        retain: u32,
    ) -> Result<AppendOutcome, RelayStorageError> {
        // The device lists live in `lists` (the faithful version is the
        // contract's words, which the memory storage also implements).
        let head = self.device_list_head(account)?;
        let stored = self.lists.contains_key(&(*account, list.version));
        let extends = match &head {
            None => list.version == 1,
            Some(h) => {
                list.version != 1 && h.version == list.version - 1 && h.body_hash == *previous
            }
        };
        let ok = match self.fault {
            Fault::AppendIgnoresHead => !stored && head.map_or(0, |h| h.version) < list.version,
            Fault::AppendOverwrites => extends || stored,
            _ => extends,
        };
        if !ok {
            return Ok(AppendOutcome::HeadMoved);
        }
        self.lists.insert((*account, list.version), list.clone());
        if self.fault != Fault::RetainsAll {
            let floor = list.version.saturating_sub(u64::from(retain.max(1)));
            self.lists.retain(|(a, v), _| a != account || *v > floor);
        }
        Ok(AppendOutcome::Appended)
    }
    fn purge_challenges(&mut self, now: u64) -> Result<u64, RelayStorageError> {
        if self.fault == Fault::PurgeUnsupported {
            return Err(RelayStorageError::Backend("purge not supported".into()));
        }
        self.inner.purge_challenges(now)
    }
}

mod limits {
    use cubbyhole::relay::MailboxLimits;

    pub const OPEN: MailboxLimits = MailboxLimits {
        max_envelopes: u32::MAX,
        max_bytes: u64::MAX,
        expire_before: 0,
    };
}

fn failed(fault: Fault) -> Vec<Violation> {
    match conformance::try_run(Broken::maker(fault)) {
        Ok(()) => Vec::new(),
        Err(violations) => violations,
    }
}

fn failed_checks(fault: Fault) -> Vec<&'static str> {
    failed(fault).iter().map(|v| v.check).collect()
}

#[test]
fn the_faithful_wrapper_conforms() {
    assert_eq!(failed(Fault::None), Vec::new());
}

/// Each fault is caught by the check that covers it (and maybe others).
#[test]
fn every_fault_is_caught_by_its_check() {
    let cases = [
        (Fault::ReplayEqualCounter, "upload_counter"),
        (Fault::BoundWritesRecord, "prekey_bound"),
        (Fault::ClaimKeeps, "claim"),
        (Fault::InsertNotIdempotent, "insert"),
        (Fault::BoundsBeforeDuplicates, "insert_bounds"),
        (Fault::BatchIgnoresEarlier, "insert_batch"),
        (Fault::ListNewestFirst, "list"),
        (Fault::ListIgnoresBytes, "list"),
        (Fault::AckDeletesAll, "acknowledge"),
        (Fault::UsageNoBytes, "usage"),
        (Fault::ExpireInclusive, "expiry"),
        (Fault::ChallengeReusable, "challenges"),
        (Fault::ChallengeForgetsAll, "challenges"),
        (Fault::ClaimIgnoresBudget, "claim_budget"),
        (Fault::KeyReplaced, "relay_key"),
        (Fault::PurgeUnsupported, "challenges"),
        (Fault::CommitDrops, "groups"),
        (Fault::ClampsCreated, "large_values"),
        (Fault::NotFresh, "empty"),
        (Fault::AppendIgnoresHead, "device_lists"),
        (Fault::AppendOverwrites, "device_lists"),
        (Fault::RetainsAll, "device_list_retention"),
    ];
    let mut missed = Vec::new();
    for (fault, check) in cases {
        let checks = failed_checks(fault);
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
fn a_violation_names_the_method_and_the_error() {
    let violations = failed(Fault::PurgeUnsupported);
    let v = violations
        .iter()
        .find(|v| v.check == "challenges")
        .expect("challenges fails");
    assert!(
        v.message.contains("RelayStorage::purge_challenges") && v.message.contains("not supported"),
        "{v}"
    );
    assert!(v
        .to_string()
        .starts_with("relay storage conformance: challenges: "));
}

#[test]
#[should_panic(expected = "relay storage conformance: claim: ")]
fn run_panics_naming_the_check() {
    conformance::run(Broken::maker(Fault::ClaimKeeps));
}
