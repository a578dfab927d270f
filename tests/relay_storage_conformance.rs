//! The `RelayStorage` conformance suite (`cubbyhole::relay::conformance`):
//! the in-memory and SQLite relay storages pass it, and deliberately broken
//! storages fail it, each at the check that covers its fault. (The relay
//! crate runs it against PostgreSQL: `relay/tests/relay_storage_conformance.rs`.)

use cubbyhole::relay::conformance::{self, Violation, CHECKS};
use cubbyhole::relay::{
    AppendOutcome, ClaimBudget, ClaimOutcome, DeviceRecord, InsertOutcome, MailboxLimits,
    MailboxUsage, MemoryRelayStorage, RelayKey, RelayStorage, RelayStorageError, Share,
    StoredDeviceList, UploadOutcome,
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
    /// `insert_envelope` bounds a share by the envelopes and bytes of both
    /// shares.
    SharesCombined,
    /// `insert_envelope` stores every envelope in the contacts' share.
    StrangersAsContacts,
    /// A duplicate is recognised only within its share.
    DuplicatesPerShare,
    /// `acknowledge_envelopes` takes a strangers' envelope off the totals
    /// but not off the strangers' counts.
    AckKeepsStrangerCount,
    /// An upload without an access verifier clears the stored one.
    UploadClearsAccess,
    /// A rotation does not keep the previous verifier.
    RotationForgetsPrevious,
    /// `mailbox_owner` finds nothing.
    NoMailboxOwner,
    /// `consume_challenge` does not mark the owner seen.
    ChallengeNotSeen,
    /// A refused `consume_challenge` marks the owner seen too.
    RefusedChallengeSeen,
    /// `expire_inactive` expires every mailbox, active or not.
    InactiveIgnoresSeen,
    /// `expire_inactive` also deletes what was received at the cutoff.
    InactiveInclusive,
    /// `expire_devices` hides the idle devices' records but keeps their
    /// pools, mailboxes and challenges.
    DevicesOnlyHidden,
    /// `expire_devices` also deletes devices seen at the cutoff.
    DevicesInclusive,
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
    /// For the faults of `owner_seen_at`: the value reads report, by
    /// device, where it differs from the inner storage's.
    seen: std::collections::HashMap<DeviceAddress, u64>,
    /// For the faults of the access verifiers: the `access` reads report.
    access: std::collections::HashMap<DeviceAddress, Option<cubbyhole::transport::AccessVerifier>>,
    /// For `DevicesOnlyHidden`: the devices reads do not see.
    hidden: std::collections::HashSet<DeviceAddress>,
    /// Every device with an applied upload.
    known: std::collections::HashSet<DeviceAddress>,
    /// For `DuplicatesPerShare`: the share of each envelope stored.
    shares: std::collections::HashMap<(MailboxId, EnvelopeId), Share>,
    /// For `AckKeepsStrangerCount`: what the strangers' counts of each
    /// mailbox still hold of acknowledged envelopes.
    stale: std::collections::HashMap<MailboxId, (u64, u64)>,
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
                .insert_envelope(
                    &MailboxId([0; 32]),
                    &left_over,
                    Share::Contacts,
                    1,
                    limits::OPEN,
                )
                .unwrap();
        }
        Broken {
            inner,
            fault,
            group: None,
            lists: std::collections::BTreeMap::new(),
            key: None,
            seen: std::collections::HashMap::new(),
            access: std::collections::HashMap::new(),
            hidden: std::collections::HashSet::new(),
            known: std::collections::HashSet::new(),
            shares: std::collections::HashMap::new(),
            stale: std::collections::HashMap::new(),
        }
    }
    fn maker(fault: Fault) -> impl FnMut() -> Broken {
        move || Broken::new(fault)
    }

    /// A record as the faults make reads report it.
    fn shown(&self, record: Option<DeviceRecord>) -> Option<DeviceRecord> {
        let mut record = record?;
        if self.hidden.contains(&record.device) {
            return None;
        }
        if let Some(seen) = self.seen.get(&record.device) {
            record.owner_seen_at = *seen;
        }
        if let Some(access) = self.access.get(&record.device) {
            record.access = *access;
        }
        if self.fault == Fault::RotationForgetsPrevious {
            record.previous_access = None;
        }
        Some(record)
    }

    /// `apply_upload` with the upload faults.
    fn apply_upload_inner(
        &mut self,
        upload: &BundleSetUpload,
        published_at: u64,
        max_one_time_prekeys: u32,
        stored: Option<DeviceRecord>,
    ) -> Result<UploadOutcome, RelayStorageError> {
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
    /// `insert_envelope` with the insert faults of the suite before shares.
    fn insert_one(
        &mut self,
        mailbox: &MailboxId,
        envelope: &Envelope,
        share: Share,
        received_at: u64,
        limits: MailboxLimits,
    ) -> Result<InsertOutcome, RelayStorageError> {
        let outcome = match self.fault {
            Fault::InsertNotIdempotent => {
                // A duplicate goes in under another id.
                let outcome =
                    self.inner
                        .insert_envelope(mailbox, envelope, share, received_at, limits)?;
                if outcome == InsertOutcome::Duplicate {
                    let mut copy = envelope.clone();
                    copy.id.0[15] ^= 0xff;
                    return self
                        .inner
                        .insert_envelope(mailbox, &copy, share, received_at, limits);
                }
                Ok(outcome)
            }
            Fault::BoundsBeforeDuplicates => {
                let usage = self.inner.mailbox_usage(mailbox)?;
                if usage.envelopes >= u64::from(limits.max_envelopes) {
                    return Ok(InsertOutcome::TooManyEnvelopes);
                }
                self.inner
                    .insert_envelope(mailbox, envelope, share, received_at, limits)
            }
            _ => self
                .inner
                .insert_envelope(mailbox, envelope, share, received_at, limits),
        }?;
        if outcome == InsertOutcome::Stored {
            self.shares.insert((*mailbox, envelope.id), share);
        }
        Ok(outcome)
    }

    fn is_pending(&self, mailbox: &MailboxId, id: &EnvelopeId) -> bool {
        self.inner
            .list_envelopes(mailbox, 0, u32::MAX, u64::MAX)
            .is_ok_and(|all| all.iter().any(|e| e.id == *id))
    }
}

impl RelayStorage for Broken {
    fn device(&self, device: &DeviceAddress) -> Result<Option<DeviceRecord>, RelayStorageError> {
        let record = self.shown(self.inner.device(device)?);
        if self.fault == Fault::ClampsCreated {
            return Ok(record.map(|mut r| {
                r.signed_prekey.created = r.signed_prekey.created.min(i64::MAX as u64);
                r
            }));
        }
        Ok(record)
    }
    fn mailbox_exists(&self, mailbox: &MailboxId) -> Result<bool, RelayStorageError> {
        Ok(self.mailbox_owner(mailbox)?.is_some())
    }
    fn mailbox_owner(
        &self,
        mailbox: &MailboxId,
    ) -> Result<Option<DeviceRecord>, RelayStorageError> {
        if self.fault == Fault::NoMailboxOwner {
            return Ok(None);
        }
        Ok(self.shown(self.inner.mailbox_owner(mailbox)?))
    }
    fn expire_inactive(
        &mut self,
        seen_before: u64,
        received_before: u64,
    ) -> Result<u64, RelayStorageError> {
        match self.fault {
            Fault::InactiveIgnoresSeen => self.inner.expire_inactive(u64::MAX, received_before),
            Fault::InactiveInclusive => self
                .inner
                .expire_inactive(seen_before, received_before.saturating_add(1)),
            _ => self.inner.expire_inactive(seen_before, received_before),
        }
    }
    fn expire_devices(&mut self, seen_before: u64) -> Result<u64, RelayStorageError> {
        match self.fault {
            Fault::DevicesInclusive => self.inner.expire_devices(seen_before.saturating_add(1)),
            Fault::DevicesOnlyHidden => {
                // The records look deleted; nothing else is.
                let mut idle = Vec::new();
                for device in &self.known {
                    if self
                        .device(device)?
                        .is_some_and(|r| r.owner_seen_at < seen_before)
                    {
                        idle.push(*device);
                    }
                }
                self.hidden.extend(idle.iter().copied());
                Ok(idle.len() as u64)
            }
            _ => self.inner.expire_devices(seen_before),
        }
    }
    fn apply_upload(
        &mut self,
        upload: &BundleSetUpload,
        published_at: u64,
        max_one_time_prekeys: u32,
    ) -> Result<UploadOutcome, RelayStorageError> {
        let stored = self.inner.device(&upload.device)?;
        let outcome =
            self.apply_upload_inner(upload, published_at, max_one_time_prekeys, stored)?;
        if outcome == UploadOutcome::Applied {
            self.known.insert(upload.device);
            self.hidden.remove(&upload.device);
            self.seen.remove(&upload.device);
            if self.fault == Fault::UploadClearsAccess && upload.access_verifier.is_none() {
                self.access.insert(upload.device, None);
            } else {
                self.access.remove(&upload.device);
            }
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
        share: Share,
        received_at: u64,
        limits: MailboxLimits,
    ) -> Result<InsertOutcome, RelayStorageError> {
        match self.fault {
            Fault::SharesCombined => {
                let usage = self.inner.mailbox_usage(mailbox)?;
                let max = match share {
                    Share::Contacts => limits.max_envelopes,
                    Share::Strangers => limits.max_stranger_envelopes,
                };
                if usage.envelopes >= u64::from(max) && !self.is_pending(mailbox, &envelope.id) {
                    return Ok(InsertOutcome::TooManyEnvelopes);
                }
                self.insert_one(mailbox, envelope, share, received_at, limits)
            }
            Fault::StrangersAsContacts => {
                // Checked and stored as a contact's.
                self.insert_one(mailbox, envelope, Share::Contacts, received_at, limits)
            }
            Fault::DuplicatesPerShare => {
                let other = self.shares.get(&(*mailbox, envelope.id)).copied();
                if other.is_some_and(|other| other != share) {
                    // New to its share: stored (under another id).
                    let mut copy = envelope.clone();
                    copy.id.0[15] ^= 0x55;
                    return self.insert_one(mailbox, &copy, share, received_at, limits);
                }
                self.insert_one(mailbox, envelope, share, received_at, limits)
            }
            _ => self.insert_one(mailbox, envelope, share, received_at, limits),
        }
    }

    fn insert_envelopes(
        &mut self,
        batch: &[(MailboxId, Envelope, Share)],
        received_at: u64,
        limits: MailboxLimits,
    ) -> Result<Vec<InsertOutcome>, RelayStorageError> {
        if self.fault == Fault::BatchIgnoresEarlier {
            let before = self.inner.clone();
            let mut outcomes = Vec::new();
            for (mailbox, envelope, share) in batch {
                let mut alone = before.clone();
                let outcome =
                    alone.insert_envelope(mailbox, envelope, *share, received_at, limits)?;
                if outcome == InsertOutcome::Stored {
                    self.inner.insert_envelope(
                        mailbox,
                        envelope,
                        *share,
                        received_at,
                        limits::OPEN,
                    )?;
                }
                outcomes.push(outcome);
            }
            return Ok(outcomes);
        }
        batch
            .iter()
            .map(|(m, e, share)| self.insert_envelope(m, e, *share, received_at, limits))
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
        let (envelopes, bytes) = self.stale.get(mailbox).copied().unwrap_or_default();
        Ok(MailboxUsage {
            stranger_envelopes: usage.stranger_envelopes + envelopes,
            stranger_bytes: usage.stranger_bytes + bytes,
            ..usage
        })
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
        if self.fault == Fault::AckKeepsStrangerCount {
            for e in self.inner.list_envelopes(mailbox, 0, u32::MAX, u64::MAX)? {
                if ids.contains(&e.id)
                    && self.shares.get(&(*mailbox, e.id)) == Some(&Share::Strangers)
                {
                    let stale = self.stale.entry(*mailbox).or_default();
                    stale.0 += 1;
                    stale.1 += e.payload.len() as u64;
                }
            }
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
        let owner = self.mailbox_owner(mailbox)?;
        let used = self
            .inner
            .consume_challenge(mailbox, challenge, now, expires_at)?;
        if let Some(owner) = owner {
            if used && self.fault == Fault::ChallengeNotSeen {
                self.seen.insert(owner.device, owner.owner_seen_at);
            }
            if !used && self.fault == Fault::RefusedChallengeSeen {
                self.seen.insert(owner.device, owner.owner_seen_at.max(now));
            }
        }
        Ok(used)
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
        max_stranger_envelopes: u32::MAX,
        max_stranger_bytes: u64::MAX,
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
        (Fault::SharesCombined, "shares"),
        (Fault::StrangersAsContacts, "shares"),
        (Fault::DuplicatesPerShare, "shares"),
        (Fault::AckKeepsStrangerCount, "shares"),
        (Fault::UploadClearsAccess, "access"),
        (Fault::RotationForgetsPrevious, "access"),
        (Fault::NoMailboxOwner, "access"),
        (Fault::ChallengeNotSeen, "owner_seen"),
        (Fault::RefusedChallengeSeen, "owner_seen"),
        (Fault::InactiveIgnoresSeen, "inactive"),
        (Fault::InactiveInclusive, "inactive"),
        (Fault::DevicesOnlyHidden, "expire_devices"),
        (Fault::DevicesInclusive, "expire_devices"),
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
