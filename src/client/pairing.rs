//! Pairing a new device into an account over the relay (SPEC.md 25.9,
//! [crate]).
//!
//! The new device N shows a [`PairingOffer`] (its identity key, its device
//! number and a random pairing code, kept in its store with an expiry);
//! an existing device E decodes it ([`Client::pair`]), builds version
//! v + 1 of its account's list adding N, signs it and sends N a
//! [`PairingMessage`] (the code, the list, the account's contacts) as an
//! ordinary client message in their pairwise session, through the outbox.
//! N's [`Client::receive`] takes it from the inbox: if the code matches
//! the pending offer (constant time) and the list lists N and extends the
//! directory's chain from a version that lists the sender, N countersigns,
//! publishes and keeps the account, fetches the contacts and drops the
//! offer; otherwise it is refused with a [`PairingRefusal`] and nothing
//! changes.

use std::vec::Vec;

use rand_core::CryptoRngCore;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::accounts::{record_of, ACCOUNT_HEADER_LEN, ACCOUNT_MESSAGE_MAGIC};
use super::{Client, ClientError, Sent};
use crate::bounds::MaybeSend;
use crate::protocol::devices::{AccountId, DeviceList, DeviceListChain, DeviceListError};
use crate::protocol::keys::IdentityKey;
use crate::protocol::time::check_timestamp;
use crate::storage::{MessageId, PairingRecord, Store, Trust};
use crate::transport::{
    DeviceAddress, DeviceDirectory, EnvelopeId, Mailbox, PrekeyDirectory, TransportError,
};

/// The format byte of a pairing payload.
pub const PAIRING_FORMAT: u8 = 0x01;
/// The length of a pairing payload: `0x01 || IK (32) || device_id (4) ||
/// code (16)`.
pub const PAIRING_PAYLOAD_LEN: usize = 1 + 32 + 4 + 16;
/// The account-header kind of a pairing message.
pub const PAIRING_KIND: u8 = 0x03;
/// How long an offer stays valid (seconds): 10 minutes.
pub const PAIRING_TTL: u64 = 600;
/// The most contacts a pairing message carries.
pub const MAX_PAIRING_CONTACTS: usize = 256;
/// The length of one contact in a pairing message: `account (32) || trust
/// (1) || version (8) || head hash (32)`.
pub const PAIRING_CONTACT_LEN: usize = 32 + 1 + 8 + 32;

/// A contact account as the pairing device holds it: the new device takes
/// its trust if it fetches the very same head (SPEC.md 25.9).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PairingContact {
    /// The contact's account.
    pub account: AccountId,
    /// The trust the pairing device has in the person.
    pub trust: Trust,
    /// The version of the list the pairing device holds.
    pub version: u64,
    /// `list_hash` of that list's body (SPEC.md 25.3).
    pub head_hash: [u8; 32],
}

/// Why pairing payload bytes were refused ([`PairingOffer::decode`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PayloadError {
    /// Not [`PAIRING_PAYLOAD_LEN`] bytes (the length found).
    Length(usize),
    /// An unknown format byte.
    Format(u8),
    /// The identity key is not a valid Ed25519 public key.
    IdentityKey,
}

impl core::fmt::Display for PayloadError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            PayloadError::Length(n) => write!(f, "pairing payload of {n} bytes"),
            PayloadError::Format(b) => write!(f, "unknown pairing payload format {b:#04x}"),
            PayloadError::IdentityKey => f.write_str("invalid identity key in pairing payload"),
        }
    }
}

impl std::error::Error for PayloadError {}

/// What a new device shows to be paired (as a QR code or text).
#[derive(Clone, PartialEq, Eq)]
pub struct PairingOffer {
    /// The new device.
    pub device: DeviceAddress,
    /// The pairing code (secret until shown).
    pub code: Zeroizing<[u8; 16]>,
    /// When the offer expires (unix seconds; not in the payload).
    pub expires_at: u64,
}

impl core::fmt::Debug for PairingOffer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PairingOffer")
            .field("device", &self.device)
            .field("code", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

impl PairingOffer {
    /// The payload: `0x01 || IK (32) || device_id (4, big-endian) || code
    /// (16)`.
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(PAIRING_PAYLOAD_LEN));
        out.push(PAIRING_FORMAT);
        out.extend_from_slice(&self.device.identity);
        out.extend_from_slice(&self.device.device_id.to_be_bytes());
        out.extend_from_slice(&self.code[..]);
        out
    }

    /// Decodes a payload (checks, in order: length, format byte, identity
    /// key). The expiry is not in the payload: `expires_at` is 0.
    ///
    /// # Errors
    /// [`PayloadError`].
    pub fn decode(bytes: &[u8]) -> Result<PairingOffer, PayloadError> {
        if bytes.len() != PAIRING_PAYLOAD_LEN {
            return Err(PayloadError::Length(bytes.len()));
        }
        if bytes[0] != PAIRING_FORMAT {
            return Err(PayloadError::Format(bytes[0]));
        }
        let identity =
            IdentityKey::from_bytes(&bytes[1..33]).map_err(|_| PayloadError::IdentityKey)?;
        let mut id = [0u8; 4];
        id.copy_from_slice(&bytes[33..37]);
        let mut code = Zeroizing::new([0u8; 16]);
        code.copy_from_slice(&bytes[37..53]);
        Ok(PairingOffer {
            device: DeviceAddress::new(&identity, u32::from_be_bytes(id)),
            code,
            expires_at: 0,
        })
    }
}

/// The body of a pairing message (inside the encrypted frame):
/// `"\x00chacct1" (8) || 0x03 || message id (16) || account (32) || code
/// (16) || list length (2) || list || count (2) || count × account id
/// (32)`.
#[derive(Clone, PartialEq, Eq)]
pub struct PairingMessage {
    /// A random id (the message's logical id).
    pub message: MessageId,
    /// The pairing code from the offer.
    pub code: Zeroizing<[u8; 16]>,
    /// Version v + 1 of the account's list, adding the new device, signed
    /// by the sender.
    pub list: DeviceList,
    /// The account's contacts (at most [`MAX_PAIRING_CONTACTS`]).
    pub contacts: Vec<PairingContact>,
}

impl core::fmt::Debug for PairingMessage {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PairingMessage")
            .field("message", &self.message)
            .field("code", &"<redacted>")
            .field("account", self.list.account_id())
            .field("version", &self.list.version())
            .field("contacts", &self.contacts.len())
            .finish()
    }
}

impl PairingMessage {
    /// The message body.
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let list = self.list.encode();
        let contacts = &self.contacts[..self.contacts.len().min(MAX_PAIRING_CONTACTS)];
        let mut out = Zeroizing::new(Vec::with_capacity(
            ACCOUNT_HEADER_LEN + 16 + 2 + list.len() + 2 + PAIRING_CONTACT_LEN * contacts.len(),
        ));
        out.extend_from_slice(&ACCOUNT_MESSAGE_MAGIC);
        out.push(PAIRING_KIND);
        out.extend_from_slice(&self.message.0);
        out.extend_from_slice(self.list.account_id().as_bytes());
        out.extend_from_slice(&self.code[..]);
        out.extend_from_slice(&(list.len() as u16).to_be_bytes());
        out.extend_from_slice(&list);
        out.extend_from_slice(&(contacts.len() as u16).to_be_bytes());
        for c in contacts {
            out.extend_from_slice(c.account.as_bytes());
            out.push(c.trust.code());
            out.extend_from_slice(&c.version.to_be_bytes());
            out.extend_from_slice(&c.head_hash);
        }
        out
    }

    /// Whether `body` is a pairing message (starts with the magic and kind
    /// 0x03), whether or not it decodes.
    pub fn is_pairing(body: &[u8]) -> bool {
        body.len() > 8 && body[..8] == ACCOUNT_MESSAGE_MAGIC && body[8] == PAIRING_KIND
    }

    /// Decodes a pairing message body.
    ///
    /// # Errors
    /// [`PairingRefusal::Malformed`]: not a pairing message, a length that
    /// does not fit, a list that does not decode, an account that is not
    /// the list's, more than [`MAX_PAIRING_CONTACTS`] contacts, trailing
    /// bytes.
    pub fn decode(body: &[u8]) -> Result<PairingMessage, PairingRefusal> {
        let bad = PairingRefusal::Malformed;
        if !Self::is_pairing(body) {
            return Err(bad);
        }
        fn take<'a>(r: &mut &'a [u8], n: usize) -> Result<&'a [u8], PairingRefusal> {
            let (a, b) = r.split_at_checked(n).ok_or(PairingRefusal::Malformed)?;
            *r = b;
            Ok(a)
        }
        fn array<const N: usize>(r: &mut &[u8]) -> Result<[u8; N], PairingRefusal> {
            take(r, N)?
                .try_into()
                .map_err(|_| PairingRefusal::Malformed)
        }
        let mut r = &body[9..];
        let message = MessageId(array(&mut r)?);
        let account = AccountId(array(&mut r)?);
        let code = Zeroizing::new(array::<16>(&mut r)?);
        let len = u16::from_be_bytes(array(&mut r)?);
        let list = DeviceList::decode(take(&mut r, usize::from(len))?).map_err(|_| bad.clone())?;
        if *list.account_id() != account {
            return Err(bad);
        }
        let count = usize::from(u16::from_be_bytes(array(&mut r)?));
        if count > MAX_PAIRING_CONTACTS {
            return Err(bad);
        }
        // Reserve only what the remaining bytes can hold: `count` alone
        // would reserve for 256 contacts before their bytes are there.
        let mut contacts = Vec::with_capacity(count.min(r.len() / PAIRING_CONTACT_LEN));
        for _ in 0..count {
            let account = AccountId(array(&mut r)?);
            let [trust] = array::<1>(&mut r)?;
            let trust = Trust::from_code(trust).ok_or(PairingRefusal::Malformed)?;
            let version = u64::from_be_bytes(array(&mut r)?);
            let head_hash = array(&mut r)?;
            contacts.push(PairingContact {
                account,
                trust,
                version,
                head_hash,
            });
        }
        if !r.is_empty() {
            return Err(bad);
        }
        Ok(PairingMessage {
            message,
            code,
            list,
            contacts,
        })
    }
}

/// Why a received pairing message was refused (checked in this order;
/// nothing changes).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PairingRefusal {
    /// The body does not decode as a pairing message.
    Malformed,
    /// No offer is pending (none was made, or it was used).
    NoOffer,
    /// The offer expired (it is dropped).
    Expired,
    /// The code is not the offer's.
    WrongCode,
    /// The list does not list this device with its device number.
    NotListed,
    /// This device belongs to another account already.
    HasAccount,
    /// The directory's chain of the account does not reach the version the
    /// list follows.
    Chain(DeviceListError),
    /// The sender device is not in the version the list follows.
    Stranger,
    /// The list, countersigned, is not a valid successor of that version.
    List(DeviceListError),
    /// The directory refused the countersigned list (e.g. another list of
    /// that version was published first).
    Directory(TransportError),
}

/// What [`Client::receive`] did with a pairing message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PairingOutcome {
    /// This device joined the account: the list is published and stored,
    /// the contacts fetched (how many of them could be).
    Joined {
        /// The account.
        account: AccountId,
        /// Its list's version now.
        version: u64,
        /// Contacts fetched and stored.
        contacts: usize,
        /// Of those, the ones whose trust was taken from the pairing
        /// device (validated or compromised there, and the head fetched
        /// is the one it holds).
        trusted: usize,
    },
    /// Refused; nothing changed.
    Refused(PairingRefusal),
}

fn gap() -> DeviceListError {
    DeviceListError::Gap
}

impl<S: Store, D: PrekeyDirectory + DeviceDirectory, M: Mailbox> Client<S, D, M> {
    /// Makes a pairing offer for this device (which has no account yet):
    /// a random code kept in the store (replacing any earlier offer) until
    /// `now + PAIRING_TTL`. Show [`PairingOffer::encode`]; the bundle must
    /// be published ([`Client::maintain_prekeys`]).
    ///
    /// # Errors
    /// [`ClientError::AlreadyPaired`] if this device already has an
    /// account; [`ClientError::Store`].
    pub async fn pairing_offer(
        &mut self,
        rng: &mut (impl CryptoRngCore + MaybeSend),
        now: u64,
    ) -> Result<PairingOffer, ClientError> {
        check_timestamp(now)?;
        if self.store.own_account().await?.is_some() {
            return Err(ClientError::AlreadyPaired);
        }
        let mut code = Zeroizing::new([0u8; 16]);
        rng.fill_bytes(&mut code[..]);
        let expires_at = now.saturating_add(PAIRING_TTL);
        self.store
            .set_pairing(Some(&PairingRecord {
                code: code.clone(),
                created_at: now,
                expires_at,
            }))
            .await?;
        Ok(PairingOffer {
            device: self.address(),
            code,
            expires_at,
        })
    }

    /// The pending pairing offer, if any (to show it again after a
    /// restart).
    ///
    /// # Errors
    /// [`ClientError::Store`].
    pub async fn pending_pairing(&self) -> Result<Option<PairingOffer>, ClientError> {
        Ok(self.store.pairing().await?.map(|r| PairingOffer {
            device: self.address(),
            code: r.code.clone(),
            expires_at: r.expires_at,
        }))
    }

    /// Pairs the device whose payload was scanned into this device's
    /// account: builds version v + 1 adding it ([`Client::add_device`]),
    /// and sends it a [`PairingMessage`] with the code and the account's
    /// contacts (the first [`MAX_PAIRING_CONTACTS`] by account id), as a
    /// client message committed to the outbox (re-sent until the device
    /// acknowledges it, as [`Client::send`]'s are).
    ///
    /// # Errors
    /// [`ClientError::Payload`] for malformed payload bytes;
    /// [`ClientError::NoAccount`]; [`ClientError::DeviceList`] (a full
    /// list, the device or its number listed already);
    /// [`Client::send`]'s errors (the new device's bundle must be
    /// published).
    pub async fn pair(
        &mut self,
        rng: &mut (impl CryptoRngCore + MaybeSend),
        payload: &[u8],
        now: u64,
    ) -> Result<Sent, ClientError> {
        check_timestamp(now)?;
        let offer = PairingOffer::decode(payload).map_err(ClientError::Payload)?;
        let list = self.add_device(&offer.device).await?;
        let mut contacts: Vec<PairingContact> = Vec::new();
        for r in self.store.accounts().await? {
            // A stored head that does not decode is left out (the new
            // device can still add the contact itself).
            if let Ok(head) = DeviceList::decode(&r.head) {
                contacts.push(PairingContact {
                    account: r.account,
                    trust: r.trust,
                    version: head.version(),
                    head_hash: *head.body_hash(),
                });
            }
        }
        contacts.sort_unstable_by_key(|c| c.account.0);
        contacts.truncate(MAX_PAIRING_CONTACTS);
        let mut id = [0u8; 16];
        rng.fill_bytes(&mut id);
        let message = PairingMessage {
            message: MessageId(id),
            code: offer.code.clone(),
            list,
            contacts,
        };
        self.send(rng, &offer.device, &message.encode(), now).await
    }

    /// Takes the pairing messages [`Client::receive`] put in the inbox
    /// (call it after each receive while an offer is pending; a message
    /// waits in the inbox until then, so a crash in between loses
    /// nothing): each is refused or makes this device join the account,
    /// then is removed from the inbox. One the directory could not be
    /// asked about (unreachable) stays for the next call.
    ///
    /// # Errors
    /// [`ClientError::Store`]; [`ClientError::Transport`] for a directory
    /// failure that is neither a refusal nor unavailability.
    pub async fn take_pairings(
        &mut self,
        now: u64,
    ) -> Result<Vec<(EnvelopeId, PairingOutcome)>, ClientError> {
        let mut out = Vec::new();
        for m in self.store.inbox().await? {
            if !PairingMessage::is_pairing(&m.body) {
                continue;
            }
            let outcome = match self.take_pairing(&m.from, &m.body, now).await {
                Ok(outcome) => outcome,
                Err(PairingStep::Refused(why)) => PairingOutcome::Refused(why),
                Err(PairingStep::Later) => continue,
                Err(PairingStep::Failed(e)) => return Err(e),
            };
            self.store.remove_inbox(&m.envelope_id).await?;
            out.push((m.envelope_id, outcome));
        }
        Ok(out)
    }

    async fn take_pairing(
        &mut self,
        from: &DeviceAddress,
        body: &[u8],
        now: u64,
    ) -> Result<PairingOutcome, PairingStep> {
        let message = PairingMessage::decode(body).map_err(PairingStep::Refused)?;
        let Some(offer) = self.store.pairing().await? else {
            return Err(PairingStep::Refused(PairingRefusal::NoOffer));
        };
        if now > offer.expires_at {
            self.store.set_pairing(None).await?;
            return Err(PairingStep::Refused(PairingRefusal::Expired));
        }
        if !bool::from(offer.code[..].ct_eq(&message.code[..])) {
            return Err(PairingStep::Refused(PairingRefusal::WrongCode));
        }
        let me = self.address();
        if !message
            .list
            .devices()
            .iter()
            .any(|e| e.identity.as_bytes() == &me.identity && e.device_id == me.device_id)
        {
            return Err(PairingStep::Refused(PairingRefusal::NotListed));
        }
        let account = *message.list.account_id();
        if let Some(own) = self.store.own_account().await? {
            // Ours already (a crash after joining, before the offer was
            // dropped, lets it run again); another account: refused.
            if own.account != account {
                return Err(PairingStep::Refused(PairingRefusal::HasAccount));
            }
        }
        let chain = match self.directory.fetch_device_lists(&account, 0).await {
            Ok(lists) => lists,
            Err(TransportError::NotFound) => {
                return Err(PairingStep::Refused(PairingRefusal::Chain(gap())))
            }
            Err(TransportError::Unavailable(_)) | Err(TransportError::Io { .. }) => {
                return Err(PairingStep::Later)
            }
            Err(e) => return Err(PairingStep::Failed(e.into())),
        };
        let before = chain
            .iter()
            .map(|l| DeviceList::decode(l))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| PairingStep::Refused(PairingRefusal::Chain(e)))?
            .into_iter()
            .filter(|l| l.version() < message.list.version())
            .collect::<Vec<_>>();
        let known = DeviceListChain::accept(None, &before)
            .map_err(|e| PairingStep::Refused(PairingRefusal::Chain(e)))?;
        let head = known
            .head()
            .filter(|h| h.version().checked_add(1) == Some(message.list.version()))
            .ok_or(PairingStep::Refused(PairingRefusal::Chain(gap())))?
            .clone();
        if !head
            .devices()
            .iter()
            .any(|e| e.identity.as_bytes() == &from.identity && e.device_id == from.device_id)
        {
            return Err(PairingStep::Refused(PairingRefusal::Stranger));
        }
        let mut list = message.list.clone();
        list.sign(&self.identity.keys)
            .map_err(|e| PairingStep::Refused(PairingRefusal::List(e)))?;
        let verified = list
            .verify_successor(&head)
            .map_err(|e| PairingStep::Refused(PairingRefusal::List(e)))?;
        match self.directory.publish_device_list(&list.encode()).await {
            Ok(()) | Err(TransportError::Replayed) => {}
            Err(TransportError::Unavailable(_)) | Err(TransportError::Io { .. }) => {
                return Err(PairingStep::Later)
            }
            Err(e) => return Err(PairingStep::Refused(PairingRefusal::Directory(e))),
        }
        self.store
            .set_own_account(&record_of(&verified, Trust::Validated, None, now))
            .await?;
        self.store.set_pairing(None).await?;
        let (mut fetched, mut trusted) = (0, 0);
        for contact in &message.contacts {
            if contact.account == account {
                continue;
            }
            // A contact the directory does not serve (or that does not
            // verify) is skipped: the application can refresh it later.
            match self.refresh_account(&contact.account, now).await {
                Ok(_) => fetched += 1,
                Err(ClientError::Store(e)) => return Err(PairingStep::Failed(e.into())),
                Err(_) => continue,
            }
            if self.take_contact_trust(contact, now).await? {
                trusted += 1;
            }
        }
        Ok(PairingOutcome::Joined {
            account,
            version: verified.version(),
            contacts: fetched,
            trusted,
        })
    }
}

impl<S: Store, D: PrekeyDirectory + DeviceDirectory, M: Mailbox> Client<S, D, M> {
    /// Takes the pairing device's trust in a contact just fetched (SPEC.md
    /// 25.9): compromised there makes it compromised here; validated there
    /// makes it validated here only if this device holds the very list the
    /// pairing device validated (same version, same hash) and trusts it no
    /// less than unvalidated (a conflict found here stays compromised).
    /// Whether the trust was taken.
    async fn take_contact_trust(
        &mut self,
        contact: &PairingContact,
        now: u64,
    ) -> Result<bool, PairingStep> {
        let Some(mut record) = self.store.account(&contact.account).await? else {
            return Ok(false);
        };
        let take = match (contact.trust, record.trust) {
            (_, Trust::Compromised) | (Trust::Unvalidated, _) => false,
            (Trust::Compromised, _) => true,
            (Trust::Validated, _) => DeviceList::decode(&record.head).is_ok_and(|head| {
                head.version() == contact.version
                    && head.body_hash().ct_eq(&contact.head_hash).into()
            }),
        };
        if take && record.trust != contact.trust {
            record.trust = contact.trust;
            record.updated_at = now;
            self.store.set_account(&record).await?;
        }
        Ok(take)
    }
}

/// How one pairing message's processing ended, inside.
enum PairingStep {
    Refused(PairingRefusal),
    /// The directory is unreachable: try again at the next receive.
    Later,
    Failed(ClientError),
}

impl From<crate::storage::StoreError> for PairingStep {
    fn from(e: crate::storage::StoreError) -> Self {
        PairingStep::Failed(e.into())
    }
}
