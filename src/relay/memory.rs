//! The in-memory relay storage (tests, demos, a relay that may forget).

use std::collections::{HashMap, HashSet, VecDeque};
use std::vec::Vec;

use super::{
    AppendOutcome, ClaimBudget, ClaimOutcome, DeviceRecord, InsertOutcome, MailboxLimits,
    MailboxUsage, RelayKey, RelayStorage, RelayStorageError, Share, StoredDeviceList,
    UploadOutcome,
};
use crate::protocol::devices::AccountId;
use crate::transport::{BundleSetUpload, DeviceAddress, Envelope, EnvelopeId, MailboxId};

/// Relay storage in memory: everything is lost when it is dropped.
/// Cloning copies the whole state.
#[derive(Clone, Debug, Default)]
pub struct MemoryRelayStorage {
    devices: HashMap<DeviceAddress, DeviceRecord>,
    /// Mailbox -> the device whose mailbox it is.
    mailbox_owners: HashMap<MailboxId, DeviceAddress>,
    pools: HashMap<DeviceAddress, VecDeque<(u32, [u8; 32])>>,
    mailboxes: HashMap<MailboxId, Queue>,
    /// Per mailbox, the used challenges and when each expires.
    challenges: HashMap<MailboxId, HashMap<[u8; 32], u64>>,
    /// Per device, its claim time ([`ClaimBudget`]).
    claimed_until: HashMap<DeviceAddress, u64>,
    key: Option<RelayKey>,
    /// Per account, the stored versions, oldest first (consecutive).
    device_lists: HashMap<AccountId, VecDeque<StoredDeviceList>>,
}

#[derive(Clone, Debug, Default)]
struct Queue {
    /// Oldest first.
    pending: VecDeque<Stored>,
    pending_ids: HashSet<EnvelopeId>,
    bytes: u64,
    /// Of the pending envelopes, those of the strangers' share.
    stranger_envelopes: u64,
    stranger_bytes: u64,
    /// Acknowledged id -> receipt time.
    acknowledged: HashMap<EnvelopeId, u64>,
    /// No receipt time in `pending` or `acknowledged` is below this, so
    /// an expiry with a cutoff at or below it has nothing to scan (every
    /// deposit expires its mailbox first).
    oldest: u64,
}

#[derive(Clone, Debug)]
struct Stored {
    envelope: Envelope,
    share: Share,
    received_at: u64,
}

impl Queue {
    /// Deletes what was received before `cutoff`; returns how many pending
    /// envelopes went.
    fn expire(&mut self, cutoff: u64) -> u64 {
        if cutoff <= self.oldest {
            return 0;
        }
        let before = self.pending.len();
        let mut removed = Vec::new();
        self.pending.retain(|s| {
            let keep = s.received_at >= cutoff;
            if !keep {
                removed.push((s.envelope.id, s.envelope.payload.len() as u64, s.share));
            }
            keep
        });
        for (id, size, share) in removed {
            self.forget(&id, size, share);
        }
        self.acknowledged.retain(|_, received| *received >= cutoff);
        self.oldest = self
            .pending
            .iter()
            .map(|s| s.received_at)
            .chain(self.acknowledged.values().copied())
            .min()
            .unwrap_or(u64::MAX);
        (before - self.pending.len()) as u64
    }

    /// Takes a deleted pending envelope out of the counts.
    fn forget(&mut self, id: &EnvelopeId, size: u64, share: Share) {
        self.pending_ids.remove(id);
        self.bytes -= size;
        if share == Share::Strangers {
            self.stranger_envelopes -= 1;
            self.stranger_bytes -= size;
        }
    }

    fn is_empty(&self) -> bool {
        self.pending.is_empty() && self.acknowledged.is_empty()
    }
}

impl MemoryRelayStorage {
    /// Empty storage.
    pub fn new() -> Self {
        Self::default()
    }
}

impl RelayStorage for MemoryRelayStorage {
    fn device_list_head(
        &self,
        account: &AccountId,
    ) -> Result<Option<StoredDeviceList>, RelayStorageError> {
        Ok(self
            .device_lists
            .get(account)
            .and_then(|chain| chain.back().cloned()))
    }

    fn device_list_version(
        &self,
        account: &AccountId,
        version: u64,
    ) -> Result<Option<StoredDeviceList>, RelayStorageError> {
        Ok(self
            .device_lists
            .get(account)
            .and_then(|chain| chain.iter().find(|l| l.version == version).cloned()))
    }

    fn device_lists_after(
        &self,
        account: &AccountId,
        after: u64,
        limit: u32,
    ) -> Result<Vec<StoredDeviceList>, RelayStorageError> {
        Ok(self
            .device_lists
            .get(account)
            .map(|chain| {
                chain
                    .iter()
                    .filter(|l| l.version > after)
                    .take(limit as usize)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default())
    }

    fn append_device_list(
        &mut self,
        account: &AccountId,
        list: &StoredDeviceList,
        previous: &[u8; 32],
        retain: u32,
    ) -> Result<AppendOutcome, RelayStorageError> {
        let chain = self.device_lists.entry(*account).or_default();
        let extends = match chain.back() {
            None => list.version == 1,
            Some(head) => {
                list.version != 1 && head.version == list.version - 1 && head.body_hash == *previous
            }
        };
        if !extends {
            if chain.is_empty() {
                self.device_lists.remove(account);
            }
            return Ok(AppendOutcome::HeadMoved);
        }
        chain.push_back(list.clone());
        while chain.len() > retain.max(1) as usize {
            chain.pop_front();
        }
        Ok(AppendOutcome::Appended)
    }

    fn device(&self, device: &DeviceAddress) -> Result<Option<DeviceRecord>, RelayStorageError> {
        Ok(self.devices.get(device).copied())
    }

    fn mailbox_exists(&self, mailbox: &MailboxId) -> Result<bool, RelayStorageError> {
        Ok(self.mailbox_owners.contains_key(mailbox))
    }

    fn mailbox_owner(
        &self,
        mailbox: &MailboxId,
    ) -> Result<Option<DeviceRecord>, RelayStorageError> {
        Ok(self
            .mailbox_owners
            .get(mailbox)
            .and_then(|device| self.devices.get(device))
            .copied())
    }

    fn apply_upload(
        &mut self,
        upload: &BundleSetUpload,
        published_at: u64,
        max_one_time_prekeys: u32,
    ) -> Result<UploadOutcome, RelayStorageError> {
        if let Some(record) = self.devices.get(&upload.device) {
            if upload.counter <= record.counter {
                return Ok(UploadOutcome::Replayed);
            }
        }
        let mut pool = if upload.replace_one_time_prekeys {
            VecDeque::new()
        } else {
            self.pools.get(&upload.device).cloned().unwrap_or_default()
        };
        for &(id, key) in &upload.one_time_prekeys {
            match pool.iter_mut().find(|(pooled, _)| *pooled == id) {
                Some(entry) => entry.1 = key,
                None => pool.push_back((id, key)),
            }
        }
        if pool.len() > max_one_time_prekeys as usize {
            return Ok(UploadOutcome::TooManyOneTimePrekeys);
        }
        let old = self.devices.get(&upload.device);
        let (mut access, mut previous_access, mut access_changed_at) = old
            .map_or((None, None, 0), |r| {
                (r.access, r.previous_access, r.access_changed_at)
            });
        if let Some(verifier) = upload.access_verifier {
            if access != Some(verifier) {
                previous_access = access;
                access = Some(verifier);
                access_changed_at = published_at;
            }
        }
        self.devices.insert(
            upload.device,
            DeviceRecord {
                device: upload.device,
                counter: upload.counter,
                signed_prekey: upload.signed_prekey,
                published_at,
                access,
                previous_access,
                access_changed_at,
                owner_seen_at: published_at,
            },
        );
        self.mailbox_owners
            .insert(upload.device.mailbox(), upload.device);
        self.pools.insert(upload.device, pool);
        Ok(UploadOutcome::Applied)
    }

    fn claim_one_time_prekey(
        &mut self,
        device: &DeviceAddress,
        budget: Option<ClaimBudget>,
    ) -> Result<ClaimOutcome, RelayStorageError> {
        let claimed_until = self.claimed_until.get(device).copied().unwrap_or(0);
        let next = match budget {
            Some(budget) => match budget.admit(claimed_until) {
                Some(next) => next,
                None => return Ok(ClaimOutcome::Limited),
            },
            None => claimed_until,
        };
        let Some((id, key)) = self.pools.get_mut(device).and_then(VecDeque::pop_front) else {
            return Ok(ClaimOutcome::Empty);
        };
        self.claimed_until.insert(*device, next);
        Ok(ClaimOutcome::Claimed(id, key))
    }

    fn one_time_prekey_count(&self, device: &DeviceAddress) -> Result<u32, RelayStorageError> {
        let count = self.pools.get(device).map_or(0, VecDeque::len);
        Ok(u32::try_from(count).unwrap_or(u32::MAX))
    }

    fn insert_envelope(
        &mut self,
        mailbox: &MailboxId,
        envelope: &Envelope,
        share: Share,
        received_at: u64,
        limits: MailboxLimits,
    ) -> Result<InsertOutcome, RelayStorageError> {
        let queue = self.mailboxes.entry(*mailbox).or_default();
        queue.expire(limits.expire_before);
        if queue.pending_ids.contains(&envelope.id) || queue.acknowledged.contains_key(&envelope.id)
        {
            return Ok(InsertOutcome::Duplicate);
        }
        let (count, bytes, max_count, max_bytes) = match share {
            Share::Contacts => (
                queue.pending.len() as u64 - queue.stranger_envelopes,
                queue.bytes - queue.stranger_bytes,
                limits.max_envelopes,
                limits.max_bytes,
            ),
            Share::Strangers => (
                queue.stranger_envelopes,
                queue.stranger_bytes,
                limits.max_stranger_envelopes,
                limits.max_stranger_bytes,
            ),
        };
        if count >= u64::from(max_count) {
            return Ok(InsertOutcome::TooManyEnvelopes);
        }
        let size = envelope.payload.len() as u64;
        if bytes.saturating_add(size) > max_bytes {
            return Ok(InsertOutcome::TooManyBytes);
        }
        queue.pending_ids.insert(envelope.id);
        queue.bytes += size;
        if share == Share::Strangers {
            queue.stranger_envelopes += 1;
            queue.stranger_bytes += size;
        }
        queue.oldest = queue.oldest.min(received_at);
        queue.pending.push_back(Stored {
            envelope: envelope.clone(),
            share,
            received_at,
        });
        Ok(InsertOutcome::Stored)
    }

    fn list_envelopes(
        &self,
        mailbox: &MailboxId,
        received_since: u64,
        limit: u32,
        max_bytes: u64,
    ) -> Result<Vec<Envelope>, RelayStorageError> {
        let mut out = Vec::new();
        let Some(queue) = self.mailboxes.get(mailbox) else {
            return Ok(out);
        };
        let mut total = 0u64;
        for stored in queue
            .pending
            .iter()
            .filter(|s| s.received_at >= received_since)
        {
            if out.len() >= limit as usize {
                break;
            }
            let size = stored.envelope.payload.len() as u64;
            if !out.is_empty() && total.saturating_add(size) > max_bytes {
                break;
            }
            total = total.saturating_add(size);
            out.push(stored.envelope.clone());
        }
        Ok(out)
    }

    fn mailbox_usage(&self, mailbox: &MailboxId) -> Result<MailboxUsage, RelayStorageError> {
        Ok(self
            .mailboxes
            .get(mailbox)
            .map_or_else(MailboxUsage::default, |q| MailboxUsage {
                envelopes: q.pending.len() as u64,
                bytes: q.bytes,
                stranger_envelopes: q.stranger_envelopes,
                stranger_bytes: q.stranger_bytes,
            }))
    }

    fn acknowledge_envelopes(
        &mut self,
        mailbox: &MailboxId,
        ids: &[EnvelopeId],
    ) -> Result<u64, RelayStorageError> {
        let Some(queue) = self.mailboxes.get_mut(mailbox) else {
            return Ok(0);
        };
        let ids: HashSet<&EnvelopeId> = ids
            .iter()
            .filter(|id| queue.pending_ids.contains(id))
            .collect();
        if ids.is_empty() {
            return Ok(0);
        }
        let mut removed = Vec::new();
        queue.pending.retain(|s| {
            if ids.contains(&s.envelope.id) {
                removed.push((
                    s.envelope.id,
                    s.envelope.payload.len() as u64,
                    s.share,
                    s.received_at,
                ));
                false
            } else {
                true
            }
        });
        let count = removed.len() as u64;
        for (id, size, share, received_at) in removed {
            queue.forget(&id, size, share);
            queue.acknowledged.insert(id, received_at);
        }
        Ok(count)
    }

    fn expire_envelopes(&mut self, received_before: u64) -> Result<u64, RelayStorageError> {
        let mut expired = 0;
        self.mailboxes.retain(|_, queue| {
            expired += queue.expire(received_before);
            !queue.is_empty()
        });
        Ok(expired)
    }

    fn expire_inactive(
        &mut self,
        seen_before: u64,
        received_before: u64,
    ) -> Result<u64, RelayStorageError> {
        let mut expired = 0;
        for record in self.devices.values() {
            if record.owner_seen_at >= seen_before {
                continue;
            }
            let mailbox = record.device.mailbox();
            if let Some(queue) = self.mailboxes.get_mut(&mailbox) {
                expired += queue.expire(received_before);
                if queue.is_empty() {
                    self.mailboxes.remove(&mailbox);
                }
            }
        }
        Ok(expired)
    }

    fn expire_devices(&mut self, seen_before: u64) -> Result<u64, RelayStorageError> {
        let idle: Vec<DeviceAddress> = self
            .devices
            .values()
            .filter(|r| r.owner_seen_at < seen_before)
            .map(|r| r.device)
            .collect();
        for device in &idle {
            let mailbox = device.mailbox();
            self.devices.remove(device);
            self.pools.remove(device);
            self.claimed_until.remove(device);
            self.mailbox_owners.remove(&mailbox);
            self.mailboxes.remove(&mailbox);
            self.challenges.remove(&mailbox);
        }
        Ok(idle.len() as u64)
    }

    fn relay_key(
        &mut self,
        fresh: Option<&RelayKey>,
    ) -> Result<Option<RelayKey>, RelayStorageError> {
        if self.key.is_none() {
            self.key = fresh.cloned();
        }
        Ok(self.key.clone())
    }

    fn consume_challenge(
        &mut self,
        mailbox: &MailboxId,
        challenge: &[u8; 32],
        now: u64,
        expires_at: u64,
    ) -> Result<bool, RelayStorageError> {
        let used = self.challenges.entry(*mailbox).or_default();
        used.retain(|_, expiry| *expiry >= now);
        if used.insert(*challenge, expires_at).is_some() {
            return Ok(false);
        }
        if let Some(record) = self
            .mailbox_owners
            .get(mailbox)
            .and_then(|device| self.devices.get_mut(device))
        {
            record.owner_seen_at = record.owner_seen_at.max(now);
        }
        Ok(true)
    }

    fn purge_challenges(&mut self, now: u64) -> Result<u64, RelayStorageError> {
        let mut purged = 0;
        self.challenges.retain(|_, used| {
            let before = used.len();
            used.retain(|_, expiry| *expiry >= now);
            purged += (before - used.len()) as u64;
            !used.is_empty()
        });
        Ok(purged)
    }
}
