//! Accounts on the client (SPEC.md 25.13, [crate]): the device's own
//! account, its contacts' accounts with trust per person, and the fan-out
//! of one message to every device of a person and every other device of
//! one's own account.
//!
//! Sessions stay pairwise between devices: a message to an account is
//! encrypted once per device, each copy in its own session, and the copies
//! are committed to the outbox in one transaction
//! ([`Store::commit_send_many`]), so a crash leaves all of them or none.
//! Each copy is its own sent message (its own receipt and re-sends) under
//! a copy id derived from the logical message id and the device
//! ([`copy_id`]); the logical id, whether the copy is a "sent copy"
//! (for another device of the sender's own account) and the copy id of the
//! sender's previous message to the same device still awaiting its receipt
//! travel in the [`AccountHeader`] at the start of the message body, so
//! that [`Client::account_inbox`] shows each sender's messages in the
//! order they were sent even when the relay loses, withholds or reorders
//! some and they are re-sent.

use std::collections::HashMap;
use std::vec;
use std::vec::Vec;

use rand_core::CryptoRngCore;

use super::{Client, ClientError, Frame};
use crate::bounds::MaybeSend;
use crate::protocol::devices::{
    AccountId, DeviceEntry, DeviceList, DeviceListChain, DeviceListError, VerifiedDeviceList,
};
use crate::protocol::fingerprint::SafetyNumber;
use crate::protocol::time::check_timestamp;
use crate::storage::{
    labelled_digest16, AccountRecord, DeliveryState, InboxMessage, MessageId, PeerRecord, SendCopy,
    SentMessage, Store, Trust,
};
use crate::transport::{
    DeviceAddress, DeviceDirectory, EnvelopeId, Mailbox, PrekeyDirectory, TransportError,
};

/// The 8 bytes an account message's body starts with (SPEC.md 25.13).
pub const ACCOUNT_MESSAGE_MAGIC: [u8; 8] = *b"\x00chacct1";

/// The length of an [`AccountHeader`]'s encoding.
pub const ACCOUNT_HEADER_LEN: usize = 8 + 1 + 16 + 32 + 16;

/// What an account message says of itself, at the start of its body
/// (inside the encrypted frame: the relay sees none of it):
/// `ACCOUNT_MESSAGE_MAGIC (8) || kind (1: 0x01 to the account, 0x02 a sent
/// copy) || message id (16, the logical id) || account (32: the account the
/// message was sent to) || previous (16: a copy id, or 16 zero bytes for
/// none)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AccountHeader {
    /// A copy for another device of the sender's own account.
    pub sent_copy: bool,
    /// The logical message id (one for every copy).
    pub message: MessageId,
    /// The account the message was sent to.
    pub to: AccountId,
    /// The id of the sender's latest message to the same device that was
    /// still awaiting its receipt when this one was sent (a copy id, or the
    /// message id of a plain [`Client::send`]): the receiver shows this one
    /// after it (SPEC.md 25.13). `None` (16 zero bytes): nothing before it
    /// is outstanding.
    pub previous: Option<MessageId>,
}

impl AccountHeader {
    /// The header followed by `body`.
    pub fn encode(&self, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(ACCOUNT_HEADER_LEN + body.len());
        out.extend_from_slice(&ACCOUNT_MESSAGE_MAGIC);
        out.push(if self.sent_copy { 2 } else { 1 });
        out.extend_from_slice(&self.message.0);
        out.extend_from_slice(self.to.as_bytes());
        out.extend_from_slice(&self.previous.map_or([0; 16], |p| p.0));
        out.extend_from_slice(body);
        out
    }

    /// Splits an account message into its header and body; `None` for a
    /// body that is not one (no magic, a short header, an unknown kind).
    pub fn decode(bytes: &[u8]) -> Option<(AccountHeader, &[u8])> {
        let (header, body) = bytes.split_at_checked(ACCOUNT_HEADER_LEN)?;
        if header[..8] != ACCOUNT_MESSAGE_MAGIC {
            return None;
        }
        let sent_copy = match header[8] {
            1 => false,
            2 => true,
            _ => return None,
        };
        let message = MessageId(header[9..25].try_into().ok()?);
        let to = AccountId(header[25..57].try_into().ok()?);
        let previous: [u8; 16] = header[57..73].try_into().ok()?;
        let previous = (previous != [0; 16]).then_some(MessageId(previous));
        Some((
            AccountHeader {
                sent_copy,
                message,
                to,
                previous,
            },
            body,
        ))
    }
}

/// The id of the copy of message `message` for device `to`: its frame's
/// message id, its sent message's id and what its receipt names.
/// `SHA-256("cubbyhole/v1 copy" || message || IK || device_id)[..16]`.
pub fn copy_id(message: &MessageId, to: &DeviceAddress) -> MessageId {
    MessageId(labelled_digest16(
        b"cubbyhole/v1 copy",
        &[&message.0, &to.identity, &to.device_id.to_be_bytes()],
    ))
}

/// How a refresh changed what the device knows of an account.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AccountChange {
    /// First seen (a first version verified, or a later one taken on first
    /// use: then unvalidated).
    New,
    /// Nothing newer.
    Unchanged,
    /// Newer versions verified through the chain: trust is kept.
    Verified,
    /// A change that could not be verified (a gap): the newest list was
    /// taken on trust and the person dropped to unvalidated.
    Unverifiable,
    /// Two authentic lists of one version: the account is marked
    /// compromised, both lists kept as evidence; nothing was chosen.
    Conflict,
}

/// What [`Client::refresh_account`] (and its relatives) found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountReport {
    /// The account.
    pub account: AccountId,
    /// What changed.
    pub change: AccountChange,
    /// The trust in the person now.
    pub trust: Trust,
    /// The version of the list the device now holds.
    pub version: u64,
    /// Devices listed now that were not before.
    pub added: Vec<DeviceAddress>,
    /// Devices listed before and not now: marked compromised as devices
    /// (nothing more is sent to them or accepted from them).
    pub removed: Vec<DeviceAddress>,
}

/// The outcome of [`Client::send_to_account`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountSent {
    /// The logical message id (in every copy's header).
    pub message: MessageId,
    /// Every copy: the device and the copy's id ([`Client::delivery`]
    /// tells where it is).
    pub copies: Vec<(DeviceAddress, MessageId)>,
    /// How many copies were deposited at once (the others wait in the
    /// outbox).
    pub deposited: usize,
}

/// A received account message, as [`Client::account_inbox`] shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct AccountMessage {
    /// The envelope it came in (to remove it from the inbox).
    pub envelope_id: EnvelopeId,
    /// The sender device.
    pub from: DeviceAddress,
    /// The account whose current list holds the sender device (`None`: no
    /// account the device knows lists it).
    pub account: Option<AccountId>,
    /// Sent by another device of this device's own account (a "sent"
    /// copy): shown as sent by the account, to [`AccountHeader::to`].
    pub sent_copy: bool,
    /// The header as the sender wrote it.
    pub header: AccountHeader,
    /// Shown without the message its header names as `previous`: that one
    /// had not arrived [`ClientConfig::hold_back`](super::ClientConfig::hold_back)
    /// after this one was received (lost, or given up by its sender). If it
    /// arrives later, it is shown after this one: the only case in which a
    /// sender's messages are shown out of their order.
    pub gap_before: bool,
    /// The application's bytes.
    pub body: Vec<u8>,
    /// When it was received.
    pub received_at: u64,
}

impl core::fmt::Debug for AccountMessage {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("AccountMessage")
            .field("envelope_id", &self.envelope_id)
            .field("from", &self.from)
            .field("account", &self.account)
            .field("sent_copy", &self.sent_copy)
            .field("header", &self.header)
            .field("gap_before", &self.gap_before)
            .field("body_len", &self.body.len())
            .finish()
    }
}

fn list_error(e: DeviceListError) -> ClientError {
    ClientError::DeviceList(Box::new(e))
}

fn address(entry: &DeviceEntry) -> DeviceAddress {
    DeviceAddress::new(&entry.identity, entry.device_id)
}

/// Restores a stored head: its parent taken on first use (the store is
/// authenticated) and the head verified as its successor; a head without
/// parent is taken as it is.
fn restore(record: &AccountRecord) -> Result<VerifiedDeviceList, ClientError> {
    let head = DeviceList::decode(&record.head).map_err(list_error)?;
    match &record.parent {
        Some(parent) => {
            let parent = DeviceList::decode(parent)
                .and_then(|p| p.accept_unverified())
                .map_err(list_error)?;
            head.verify_successor(&parent).map_err(list_error)
        }
        None => head.accept_unverified().map_err(list_error),
    }
}

/// The devices of a stored head, read without verifying its signatures or
/// decoding its keys again: what the store holds was verified before it was stored, and the
/// store is trusted (SQLite: sealed at rest). Sending and attributing
/// messages use this; verifying the head again on every message cost about
/// 0.5 ms per send to two 3- and 5-device lists (BENCHMARKS.md, issue 15).
fn stored_devices(record: &AccountRecord) -> Result<Vec<DeviceAddress>, ClientError> {
    let entries = DeviceList::stored_entries(&record.head)
        .ok_or_else(|| list_error(DeviceListError::Malformed))?;
    Ok(entries
        .into_iter()
        .map(|(identity, device_id)| DeviceAddress {
            identity,
            device_id,
        })
        .collect())
}

pub(super) fn record_of(
    verified: &VerifiedDeviceList,
    trust: Trust,
    evidence: Option<(Vec<u8>, Vec<u8>)>,
    now: u64,
) -> AccountRecord {
    AccountRecord {
        account: *verified.account_id(),
        head: verified.encode(),
        parent: verified.parent().map(DeviceList::encode),
        trust,
        evidence,
        updated_at: now,
    }
}

fn devices_of(list: &DeviceList) -> Vec<DeviceAddress> {
    list.devices().iter().map(address).collect()
}

impl<S: Store, D: PrekeyDirectory + DeviceDirectory, M: Mailbox> Client<S, D, M> {
    /// Creates this device's account: the first version of its device list
    /// (this device alone, SPEC.md 25.5), stored and published. Returns the
    /// account id. An account already stored is returned as it is.
    ///
    /// # Errors
    /// [`ClientError::Store`], [`ClientError::Transport`] (the list is
    /// stored: [`Client::publish_own_account`] publishes it again).
    pub async fn create_account(&mut self, now: u64) -> Result<AccountId, ClientError> {
        check_timestamp(now)?;
        if let Some(own) = self.store.own_account().await? {
            return Ok(own.account);
        }
        let genesis = DeviceList::genesis(&self.identity.keys, self.identity.device_id);
        let verified = genesis.verify_genesis().map_err(list_error)?;
        self.store
            .set_own_account(&record_of(&verified, Trust::Validated, None, now))
            .await?;
        self.publish_own_account().await?;
        Ok(*verified.account_id())
    }

    /// Publishes the stored head of this device's own account (again: a
    /// version the directory holds already is not an error).
    ///
    /// # Errors
    /// [`ClientError::Store`], [`ClientError::Transport`],
    /// [`ClientError::NoAccount`].
    pub async fn publish_own_account(&mut self) -> Result<(), ClientError> {
        let own = self
            .store
            .own_account()
            .await?
            .ok_or(ClientError::NoAccount)?;
        match self.directory.publish_device_list(&own.head).await {
            Ok(()) | Err(TransportError::Replayed) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// This device's account, its verified current list.
    ///
    /// # Errors
    /// [`ClientError::Store`]; [`ClientError::DeviceList`] if the stored
    /// list does not verify.
    pub async fn own_account(&self) -> Result<Option<VerifiedDeviceList>, ClientError> {
        match self.store.own_account().await? {
            Some(record) => restore(&record).map(Some),
            None => Ok(None),
        }
    }

    /// Builds the next version of the own account's list adding `device`,
    /// signed by this device. It is not valid until the added device
    /// countersigns it: hand it to that device's [`Client::join_account`]
    /// (pairing, SPEC.md 25.9, carries it).
    ///
    /// # Errors
    /// [`ClientError::NoAccount`], [`ClientError::DeviceList`] (a full list,
    /// a device number in use), [`ClientError::Store`].
    pub async fn add_device(&mut self, device: &DeviceAddress) -> Result<DeviceList, ClientError> {
        let head = self.own_account().await?.ok_or(ClientError::NoAccount)?;
        let mut devices = head.devices().to_vec();
        devices.push(DeviceEntry {
            identity: crate::protocol::keys::IdentityKey::from_bytes(&device.identity)?,
            device_id: device.device_id,
        });
        let mut next = head.successor(&devices).map_err(list_error)?;
        next.sign(&self.identity.keys).map_err(list_error)?;
        next.into_list().map_err(list_error)
    }

    /// Joins the account of `list` (built by a listed device with
    /// [`Client::add_device`]): checks that it lists this device and
    /// extends the chain the directory serves, countersigns it, publishes
    /// it and keeps it as this device's own account.
    ///
    /// # Errors
    /// [`ClientError::DeviceList`] if it does not list this device or is not
    /// a valid successor once countersigned; [`ClientError::Transport`],
    /// [`ClientError::Store`].
    pub async fn join_account(&mut self, list: &DeviceList, now: u64) -> Result<(), ClientError> {
        check_timestamp(now)?;
        let mut list = list.clone();
        list.sign(&self.identity.keys).map_err(list_error)?;
        let chain = self.fetch_lists(list.account_id(), 0).await?;
        let before: Vec<DeviceList> = chain
            .into_iter()
            .filter(|l| l.version() < list.version())
            .collect();
        let known = DeviceListChain::accept(None, &before).map_err(list_error)?;
        let head = known
            .head()
            .ok_or(ClientError::DeviceList(Box::new(DeviceListError::Gap)))?;
        let verified = list.verify_successor(head).map_err(list_error)?;
        self.store
            .set_own_account(&record_of(&verified, Trust::Validated, None, now))
            .await?;
        self.publish_own_account().await
    }

    /// Removes `device` from the own account: the next version without it,
    /// signed by this device, stored and published; the device is marked
    /// compromised here (nothing more goes to it or is taken from it).
    ///
    /// # Errors
    /// [`ClientError::NoAccount`], [`ClientError::DeviceList`] (this device
    /// itself, or the last device), [`ClientError::Transport`] (the
    /// directory refused, e.g. a thief's version came first: refresh),
    /// [`ClientError::Store`].
    pub async fn remove_device(
        &mut self,
        device: &DeviceAddress,
        now: u64,
    ) -> Result<AccountReport, ClientError> {
        check_timestamp(now)?;
        let head = self.own_account().await?.ok_or(ClientError::NoAccount)?;
        let devices: Vec<DeviceEntry> = head
            .devices()
            .iter()
            .filter(|e| address(e) != *device)
            .copied()
            .collect();
        let mut next = head.successor(&devices).map_err(list_error)?;
        next.sign(&self.identity.keys).map_err(list_error)?;
        let list = next.into_list().map_err(list_error)?;
        let verified = list.verify_successor(&head).map_err(list_error)?;
        self.directory.publish_device_list(&list.encode()).await?;
        self.store
            .set_own_account(&record_of(&verified, Trust::Validated, None, now))
            .await?;
        self.revoke(&[*device], now).await?;
        Ok(AccountReport {
            account: *verified.account_id(),
            change: AccountChange::Verified,
            trust: Trust::Validated,
            version: verified.version(),
            added: Vec::new(),
            removed: vec![*device],
        })
    }

    /// Fetches the own account's newer lists from the directory (another
    /// device added or removed one) and verifies them through the chain.
    ///
    /// # Errors
    /// [`ClientError::NoAccount`], [`ClientError::Store`],
    /// [`ClientError::Transport`].
    pub async fn refresh_own_account(&mut self, now: u64) -> Result<AccountReport, ClientError> {
        check_timestamp(now)?;
        let record = self
            .store
            .own_account()
            .await?
            .ok_or(ClientError::NoAccount)?;
        let head = restore(&record)?;
        let offered = self.fetch_lists(&record.account, head.version()).await?;
        let account = record.account;
        self.take_lists(Some(record), &account, offered, now, true)
            .await
    }

    /// Fetches a contact's account from the directory and verifies what is
    /// new (SPEC.md 25.7, 25.8): a verified successor keeps the trust; a
    /// gap drops the person to unvalidated (the newest list is taken on
    /// trust); a conflict marks the person compromised and keeps both lists
    /// as evidence. Removed devices are marked compromised as devices.
    ///
    /// # Errors
    /// [`ClientError::Store`], [`ClientError::Transport`],
    /// [`ClientError::DeviceList`] for lists that prove nothing (forged,
    /// another account): nothing is changed then.
    pub async fn refresh_account(
        &mut self,
        account: &AccountId,
        now: u64,
    ) -> Result<AccountReport, ClientError> {
        check_timestamp(now)?;
        let record = self.store.account(account).await?;
        let after = match &record {
            Some(r) => restore(r)?.version(),
            None => 0,
        };
        let offered = match self.fetch_lists(account, after).await {
            Ok(lists) => lists,
            Err(ClientError::Transport(TransportError::NotFound)) if record.is_some() => Vec::new(),
            Err(e) => return Err(e),
        };
        self.take_lists(record, account, offered, now, false).await
    }

    /// Lists of a contact's account received in-band (from one of its
    /// devices, in any order): verified as [`Client::refresh_account`]
    /// verifies the directory's.
    ///
    /// # Errors
    /// As [`Client::refresh_account`].
    pub async fn offer_device_lists(
        &mut self,
        account: &AccountId,
        lists: &[Vec<u8>],
        now: u64,
    ) -> Result<AccountReport, ClientError> {
        check_timestamp(now)?;
        let record = self.store.account(account).await?;
        let offered = lists
            .iter()
            .map(|l| DeviceList::decode(l))
            .collect::<Result<Vec<_>, _>>()
            .map_err(list_error)?;
        self.take_lists(record, account, offered, now, false).await
    }

    /// The stored record of a contact's account (trust, head, evidence).
    ///
    /// # Errors
    /// [`ClientError::Store`].
    pub async fn account(&self, account: &AccountId) -> Result<Option<AccountRecord>, ClientError> {
        Ok(self.store.account(account).await?)
    }

    /// Sets the trust in a person (after comparing
    /// [`Client::account_safety_number`]: `Validated`; or `Compromised`).
    /// An account marked compromised by a conflict keeps its evidence.
    ///
    /// # Errors
    /// [`ClientError::Store`]; [`ClientError::NoAccount`] for an account
    /// never fetched.
    pub async fn set_account_trust(
        &mut self,
        account: &AccountId,
        trust: Trust,
        now: u64,
    ) -> Result<(), ClientError> {
        check_timestamp(now)?;
        let mut record = self
            .store
            .account(account)
            .await?
            .ok_or(ClientError::NoAccount)?;
        record.trust = trust;
        record.updated_at = now;
        self.store.set_account(&record).await?;
        Ok(())
    }

    /// The account safety number of this device's account and `peer`
    /// (SPEC.md 25.8).
    ///
    /// # Errors
    /// [`ClientError::NoAccount`], [`ClientError::Store`].
    pub async fn account_safety_number(
        &self,
        peer: &AccountId,
    ) -> Result<SafetyNumber, ClientError> {
        let own = self
            .store
            .own_account()
            .await?
            .ok_or(ClientError::NoAccount)?;
        Ok(SafetyNumber::for_accounts(&own.account, peer))
    }

    /// The account whose current list holds `device`: this device's own, or
    /// a contact's.
    ///
    /// # Errors
    /// [`ClientError::Store`], [`ClientError::DeviceList`] (a stored list
    /// that does not load).
    pub async fn account_of(
        &self,
        device: &DeviceAddress,
    ) -> Result<Option<AccountId>, ClientError> {
        Ok(self.device_accounts().await?.get(device).copied())
    }

    /// Which account lists each device: the own account's devices and every
    /// contact's (the own account first, so a device somehow in both is
    /// attributed to it).
    async fn device_accounts(&self) -> Result<HashMap<DeviceAddress, AccountId>, ClientError> {
        let own = self.store.own_account().await?;
        let mut map = HashMap::new();
        for record in own.iter().chain(self.store.accounts().await?.iter()) {
            for device in stored_devices(record)? {
                map.entry(device).or_insert(record.account);
            }
        }
        Ok(map)
    }

    /// Sends `body` to a person: one copy to every device of `account`'s
    /// current list and one "sent" copy to every other device of this
    /// device's own account, each encrypted in its own pairwise session,
    /// all committed to the outbox in one transaction
    /// ([`Store::commit_send_many`]) under one logical message id, then
    /// deposited. Each copy is re-sent until its device acknowledges it, as
    /// [`Client::send`]'s message is.
    ///
    /// # Errors
    /// [`ClientError::NoAccount`] (no own account, or `account` never
    /// fetched: [`Client::refresh_account`]), [`ClientError::Compromised`]
    /// (the person is marked compromised), [`ClientError::TooLong`], and
    /// [`Client::send`]'s errors for any copy: then nothing is sent.
    ///
    /// # Cancel safety
    /// As [`Client::send`]: every copy or none is committed.
    pub async fn send_to_account(
        &mut self,
        rng: &mut (impl CryptoRngCore + MaybeSend),
        account: &AccountId,
        body: &[u8],
        now: u64,
    ) -> Result<AccountSent, ClientError> {
        check_timestamp(now)?;
        if body.len() + super::accounts::ACCOUNT_HEADER_LEN > self.config.max_body {
            return Err(ClientError::TooLong);
        }
        let own = self
            .store
            .own_account()
            .await?
            .ok_or(ClientError::NoAccount)?;
        let own_devices = stored_devices(&own)?;
        let theirs = self
            .store
            .account(account)
            .await?
            .ok_or(ClientError::NoAccount)?;
        if theirs.trust == Trust::Compromised {
            return Err(ClientError::Compromised);
        }
        let their_devices = stored_devices(&theirs)?;
        let me = self.address();
        let mut targets: Vec<(DeviceAddress, bool)> = Vec::new();
        for device in their_devices {
            if device != me {
                targets.push((device, false));
            }
        }
        if own.account != *account {
            for device in own_devices {
                if device != me {
                    targets.push((device, true));
                }
            }
        }
        let mut logical = [0u8; 16];
        rng.fill_bytes(&mut logical);
        let logical = MessageId(logical);
        let mut copies: Vec<SendCopy> = Vec::with_capacity(targets.len());
        for (to, sent_copy) in &targets {
            let trust = self.check_trust(to).await?;
            let header = AccountHeader {
                sent_copy: *sent_copy,
                message: logical,
                to: *account,
                previous: self.store.last_pending_to(to).await?,
            };
            let id = copy_id(&logical, to);
            let mut frame = Frame {
                message: Some((Some(id.0), header.encode(body))),
                ..Frame::default()
            };
            let (record, entry) = self.encrypt_frame(rng, to, &mut frame, now).await?;
            let message = SentMessage {
                id,
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
            copies.push((record, entry, Some(message)));
        }
        self.store.commit_send_many(&copies).await?;
        // Committed: every copy is handed over. Deposit them all, then
        // record the outcomes in one store transaction
        // (`Store::commit_deposits`). A copy the relay refused for good is
        // failed; one not deposited now stays queued for `flush_outbox`;
        // if the record fails, every copy stays queued (the deposited ones
        // are deposited again under the same ids) and none is counted.
        let mut ids = Vec::with_capacity(copies.len());
        let mut queued = Vec::with_capacity(copies.len());
        for (_, entry, message) in copies {
            ids.push((entry.to, entry.message.unwrap_or(logical)));
            if let Some(message) = message {
                queued.push((entry, message));
            }
        }
        let deposited = match self.deposit_all(queued, now, rng).await {
            Ok(deposited) => deposited,
            Err(ClientError::Store(_)) => 0,
            Err(e) => return Err(e),
        };
        Ok(AccountSent {
            message: logical,
            copies: ids,
            deposited,
        })
    }

    /// The account messages in the inbox (those whose body carries an
    /// [`AccountHeader`]), attributed to the account whose current list
    /// holds the sender device, in **each sender's order** (SPEC.md
    /// 25.13): a message whose header names as `previous` a message of the
    /// same sender device that has not arrived is held back (not listed)
    /// until that one arrives, and is then listed after it; messages of
    /// different senders keep the order they were received in. A message
    /// held for [`ClientConfig::hold_back`](super::ClientConfig::hold_back)
    /// (counted from when it, or a message held behind it, was received;
    /// `now` is the current time) is listed anyway, with
    /// [`AccountMessage::gap_before`] set. A "sent" copy is one from
    /// another device of this device's own account that says so.
    ///
    /// The application shows what is listed and removes it
    /// ([`Client::remove_from_inbox`]); held messages stay in the inbox
    /// (already acknowledged to their sender, so they are not re-sent).
    ///
    /// # Errors
    /// [`ClientError::Store`], [`ClientError::DeviceList`].
    pub async fn account_inbox(&self, now: u64) -> Result<Vec<AccountMessage>, ClientError> {
        let own = self.store.own_account().await?.map(|r| r.account);
        let accounts = self.device_accounts().await?;
        let me = self.address();
        let mut messages = Vec::new();
        for m in self.store.inbox().await? {
            let InboxMessage {
                envelope_id,
                from,
                body,
                received_at,
            } = m;
            let Some((header, rest)) = AccountHeader::decode(&body) else {
                continue;
            };
            let account = accounts.get(&from).copied();
            let sent_copy = header.sent_copy && account.is_some() && account == own;
            messages.push(AccountMessage {
                envelope_id,
                from,
                account,
                sent_copy,
                header,
                body: rest.to_vec(),
                received_at,
                gap_before: false,
            });
        }
        let order = in_sender_order(&messages, &me);
        // Roots whose predecessor is not in the inbox: shown already (its
        // seen mark, 19.9), or not arrived.
        let outside: Vec<(usize, EnvelopeId)> = order
            .roots
            .iter()
            .filter_map(|&r| {
                let m = &messages[r];
                let previous = m.header.previous?;
                (order.parent[r] == NONE).then(|| (r, super::seen_mark(&m.from, &previous.0)))
            })
            .collect();
        let marks: Vec<EnvelopeId> = outside.iter().map(|(_, mark)| *mark).collect();
        let seen = self.store.processed_among(&marks).await?;
        let mut held = vec![false; messages.len()];
        for ((r, _), seen) in outside.iter().zip(seen) {
            if seen {
                continue;
            }
            let waited = now.saturating_sub(order.oldest[*r]);
            if waited >= self.config.hold_back {
                messages[*r].gap_before = true;
            } else {
                held[*r] = true;
            }
        }
        let mut slots: Vec<Option<AccountMessage>> = messages.into_iter().map(Some).collect();
        let mut out = Vec::with_capacity(slots.len());
        for i in order.emit {
            if !held[order.root[i]] {
                out.extend(slots[i].take());
            }
        }
        Ok(out)
    }

    /// Fetches an account's lists above `after`, decoded.
    async fn fetch_lists(
        &self,
        account: &AccountId,
        after: u64,
    ) -> Result<Vec<DeviceList>, ClientError> {
        let lists = match self.directory.fetch_device_lists(account, after).await {
            Ok(lists) => lists,
            Err(TransportError::NotFound) if after > 0 => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        lists
            .iter()
            .map(|l| DeviceList::decode(l))
            .collect::<Result<Vec<_>, _>>()
            .map_err(list_error)
    }

    /// Verifies `offered` against the stored record (SPEC.md 25.7) and
    /// stores the outcome (own: the device's own account).
    async fn take_lists(
        &mut self,
        record: Option<AccountRecord>,
        account: &AccountId,
        offered: Vec<DeviceList>,
        now: u64,
        own: bool,
    ) -> Result<AccountReport, ClientError> {
        if offered.iter().any(|l| l.account_id() != account) {
            return Err(list_error(DeviceListError::WrongAccount));
        }
        let known = record.as_ref().map(restore).transpose()?;
        // Every device this refresh knows was listed: the held head's, and
        // (below) those of every newly verified version before the new head,
        // so that a device added and removed between two refreshes (or
        // before a first one) is revoked too.
        let held: Vec<DeviceAddress> = known.as_ref().map(|h| devices_of(h)).unwrap_or_default();
        let mut before = held.clone();
        let trust = record.as_ref().map(|r| r.trust);
        let verified = DeviceListChain::accept(known.as_ref(), &offered);
        if let Ok(accepted) = &verified {
            for list in accepted.new.iter().rev().skip(1) {
                for d in devices_of(list) {
                    if !before.contains(&d) {
                        before.push(d);
                    }
                }
            }
        }
        let (head, change, trust, evidence) = match verified {
            Ok(accepted) => match (accepted.head(), &known) {
                (None, Some(known)) => (known.clone(), AccountChange::Unchanged, trust, None),
                (None, None) => return Err(ClientError::Transport(TransportError::NotFound)),
                (Some(head), None) => (head.clone(), AccountChange::New, None, None),
                (Some(head), Some(_)) => (head.clone(), AccountChange::Verified, trust, None),
            },
            Err(DeviceListError::Conflict { ours, theirs }) => {
                let Some(known) = known else {
                    return Err(list_error(DeviceListError::Conflict { ours, theirs }));
                };
                (
                    known,
                    AccountChange::Conflict,
                    Some(Trust::Compromised),
                    Some((ours.encode(), theirs.encode())),
                )
            }
            Err(DeviceListError::Gap) => {
                // Unverifiable: the newest list, taken on trust.
                let newest = offered
                    .iter()
                    .max_by_key(|l| l.version())
                    .ok_or(list_error(DeviceListError::Gap))?;
                let head = newest.accept_unverified().map_err(list_error)?;
                let change = if known.is_some() {
                    AccountChange::Unverifiable
                } else {
                    AccountChange::New
                };
                (head, change, Some(Trust::Unvalidated), None)
            }
            Err(e) => return Err(list_error(e)),
        };
        // A compromised person stays compromised (and keeps its evidence).
        let (trust, evidence) = match (&record, trust, evidence) {
            (Some(r), _, None) if r.trust == Trust::Compromised => {
                (Trust::Compromised, r.evidence.clone())
            }
            (_, trust, evidence) => (
                trust.unwrap_or(if own {
                    Trust::Validated
                } else {
                    Trust::Unvalidated
                }),
                evidence,
            ),
        };
        let now_listed = devices_of(&head);
        let removed: Vec<DeviceAddress> = before
            .iter()
            .filter(|d| !now_listed.contains(d))
            .copied()
            .collect();
        // Revoked before the new head is stored: a crash in between finds
        // the old head again and revokes again (revoking is idempotent);
        // the other order would leave a removed device trusted for good.
        self.revoke(&removed, now).await?;
        let new = record_of(&head, trust, evidence, now);
        if own {
            self.store.set_own_account(&new).await?;
        } else {
            self.store.set_account(&new).await?;
        }
        let added: Vec<DeviceAddress> = now_listed
            .iter()
            .filter(|d| !held.contains(d))
            .copied()
            .collect();
        Ok(AccountReport {
            account: *account,
            change,
            trust,
            version: head.version(),
            added,
            removed,
        })
    }

    /// Marks removed devices compromised as devices: nothing more is sent
    /// to them (their pending copies fail) or accepted from them.
    async fn revoke(&mut self, removed: &[DeviceAddress], now: u64) -> Result<(), ClientError> {
        let me = self.address();
        for device in removed {
            if *device != me {
                self.set_trust(device, Trust::Compromised, now).await?;
            }
        }
        Ok(())
    }
}

const NONE: usize = usize::MAX;

/// The per-sender order of a list of account messages (see
/// [`Client::account_inbox`]).
struct SenderOrder {
    /// Each message's predecessor in the list (`NONE`: its `previous` is
    /// none, not in the list, or it closes a cycle).
    parent: Vec<usize>,
    /// Each message's root: the first of its chain of predecessors.
    root: Vec<usize>,
    /// The roots, in list order.
    roots: Vec<usize>,
    /// Per root, the earliest `received_at` of its chain (others: unused).
    oldest: Vec<u64>,
    /// Every index once, each after its predecessor, otherwise in list
    /// order.
    emit: Vec<usize>,
}

/// Links each message to the message of the same sender device its header
/// names as `previous` (by copy id: the id the sender gave the copy for
/// `me`), then orders them. A sender that forges a cycle of `previous`
/// only orders (or holds) its own messages: the cycle is cut where it is
/// found. Linear in the number of messages.
fn in_sender_order(messages: &[AccountMessage], me: &DeviceAddress) -> SenderOrder {
    let n = messages.len();
    let mut index: HashMap<(DeviceAddress, MessageId), usize> = HashMap::with_capacity(n);
    for (i, m) in messages.iter().enumerate() {
        index
            .entry((m.from, copy_id(&m.header.message, me)))
            .or_insert(i);
    }
    let mut parent: Vec<usize> = messages
        .iter()
        .map(|m| {
            m.header
                .previous
                .and_then(|p| index.get(&(m.from, p)).copied())
                .unwrap_or(NONE)
        })
        .collect();
    // Roots, cutting cycles: walk up from each message until a message
    // whose root is known, a message without parent, or one already on
    // this walk (a cycle: cut above it).
    let mut root = vec![NONE; n];
    let mut on_walk = vec![false; n];
    let mut walk = Vec::new();
    for i in 0..n {
        let mut cur = i;
        let top = loop {
            if root[cur] != NONE {
                break root[cur];
            }
            if on_walk[cur] {
                parent[cur] = NONE;
                break cur;
            }
            on_walk[cur] = true;
            walk.push(cur);
            if parent[cur] == NONE {
                break cur;
            }
            cur = parent[cur];
        };
        for w in walk.drain(..) {
            root[w] = top;
            on_walk[w] = false;
        }
    }
    let mut oldest = vec![u64::MAX; n];
    let mut roots = Vec::new();
    for i in 0..n {
        let r = root[i];
        if r == i {
            roots.push(i);
        }
        oldest[r] = oldest[r].min(messages[i].received_at);
    }
    let mut emitted = vec![false; n];
    let mut emit = Vec::with_capacity(n);
    for i in 0..n {
        let mut cur = i;
        while !emitted[cur] {
            walk.push(cur);
            if parent[cur] == NONE {
                break;
            }
            cur = parent[cur];
        }
        for w in walk.drain(..).rev() {
            emitted[w] = true;
            emit.push(w);
        }
    }
    SenderOrder {
        parent,
        root,
        roots,
        oldest,
        emit,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: DeviceAddress = DeviceAddress {
        identity: [9; 32],
        device_id: 1,
    };

    fn sender(n: u8) -> DeviceAddress {
        DeviceAddress {
            identity: [n; 32],
            device_id: 1,
        }
    }

    /// A message from `from` with logical id `[id; 16]`, naming as
    /// previous the copy for ME of logical id `[p; 16]`.
    fn msg(from: u8, id: u8, previous: Option<u8>, received_at: u64) -> AccountMessage {
        AccountMessage {
            envelope_id: EnvelopeId([id; 16]),
            from: sender(from),
            account: None,
            sent_copy: false,
            header: AccountHeader {
                sent_copy: false,
                message: MessageId([id; 16]),
                to: AccountId([0; 32]),
                previous: previous.map(|p| copy_id(&MessageId([p; 16]), &ME)),
            },
            body: Vec::new(),
            received_at,
            gap_before: false,
        }
    }

    fn ids(order: &SenderOrder, messages: &[AccountMessage]) -> Vec<u8> {
        order
            .emit
            .iter()
            .map(|&i| messages[i].header.message.0[0])
            .collect()
    }

    #[test]
    fn each_message_comes_after_its_predecessor() {
        // Sender 1: 1 <- 2 <- 3, received 3, 1, 2; sender 2's 7 between.
        let m = [
            msg(1, 3, Some(2), 10),
            msg(2, 7, None, 11),
            msg(1, 1, None, 12),
            msg(1, 2, Some(1), 13),
        ];
        let order = in_sender_order(&m, &ME);
        assert_eq!(ids(&order, &m), vec![1, 2, 3, 7]);
        assert_eq!(order.roots, vec![1, 2]);
        assert_eq!(order.root, vec![2, 1, 2, 2]);
        assert_eq!(order.oldest[2], 10, "the chain's earliest arrival");
    }

    #[test]
    fn a_predecessor_of_another_sender_or_device_does_not_link() {
        // 2 names 1's copy, but 1 came from another sender: not linked.
        let m = [msg(1, 2, Some(1), 10), msg(2, 1, None, 11)];
        let order = in_sender_order(&m, &ME);
        assert_eq!(order.parent, vec![NONE, NONE]);
        assert_eq!(order.roots, vec![0, 1]);
        // A previous that names the copy for another device: not linked.
        let mut other = msg(1, 2, None, 10);
        other.header.previous = Some(copy_id(&MessageId([1; 16]), &sender(3)));
        let m = [other, msg(1, 1, None, 11)];
        assert_eq!(in_sender_order(&m, &ME).parent, vec![NONE, NONE]);
    }

    #[test]
    fn forged_cycles_are_cut_and_every_message_is_emitted_once() {
        // 1 -> 2 -> 3 -> 1 (each names the next as previous), a self-loop
        // 5 -> 5, and 6 hanging below the cycle.
        let m = [
            msg(1, 1, Some(2), 10),
            msg(1, 2, Some(3), 11),
            msg(1, 3, Some(1), 12),
            msg(1, 5, Some(5), 13),
            msg(1, 6, Some(3), 14),
        ];
        let order = in_sender_order(&m, &ME);
        let mut emitted = order.emit.clone();
        emitted.sort_unstable();
        assert_eq!(emitted, vec![0, 1, 2, 3, 4]);
        for (i, &p) in order.parent.iter().enumerate() {
            if p != NONE {
                let at = |x| order.emit.iter().position(|&e| e == x).unwrap();
                assert!(at(p) < at(i), "{i} after its parent {p}");
            }
        }
        // One root per cycle, cut: every member hangs from it.
        assert_eq!(order.roots.len(), 2);
        assert!(order.root[..3].iter().all(|&r| r == order.root[0]));
        assert_eq!(order.root[4], order.root[0]);
        assert_eq!(order.root[3], 3);
        assert_eq!(order.parent[3], NONE);
    }

    #[test]
    fn the_header_round_trips_and_zero_previous_is_none() {
        let h = AccountHeader {
            sent_copy: true,
            message: MessageId([1; 16]),
            to: AccountId([2; 32]),
            previous: Some(MessageId([3; 16])),
        };
        let bytes = h.encode(b"body");
        assert_eq!(bytes.len(), ACCOUNT_HEADER_LEN + 4);
        assert_eq!(&bytes[57..73], &[3; 16]);
        assert_eq!(AccountHeader::decode(&bytes), Some((h, &b"body"[..])));
        let none = AccountHeader {
            previous: None,
            ..h
        };
        let bytes = none.encode(b"");
        assert_eq!(&bytes[57..], &[0; 16]);
        assert_eq!(AccountHeader::decode(&bytes).unwrap().0.previous, None);
        assert_eq!(AccountHeader::decode(&bytes[..72]), None, "short");
    }
}
