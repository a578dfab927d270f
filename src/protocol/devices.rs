//! Accounts and device lists (SPEC.md section 25): an account (a person) is
//! a set of devices, each with its own v1 identity key; the **device list**
//! is the signed, versioned set of an account's devices. Versions form a
//! hash chain and every version is signed by devices it lists, so a contact
//! that verified one version can verify every later one without trusting
//! the directory that serves them.
//!
//! ```text
//! account_id = SHA-256("cubbyhole/v1 account" || IK_founder)
//! body    = 0x01 || account_id (32) || version (8, BE, >= 1) || previous (32)
//!           || count (1, 1..=16) || count x (IK (32) || device_id (4, BE))
//!                                   IKs strictly increasing, device ids distinct
//! signed  = body || sig_count (1, 1..=count)
//!           || sig_count x (index (1) || Ed25519 signature (64))
//!                                   indices strictly increasing, < count
//! list_hash(body)  = SHA-256("cubbyhole/v1 device list hash" || body)
//! signed message   = "cubbyhole/v1 device list" || body
//! ```
//!
//! [`DeviceList::decode`] only parses; a [`VerifiedDeviceList`] comes only
//! out of [`DeviceList::verify_genesis`], [`DeviceList::verify_successor`],
//! [`DeviceList::accept_unverified`] or [`DeviceListChain::accept`].

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::fmt;

use sha2::{Digest, Sha256};

use crate::protocol::keys::{IdentityKey, IdentityKeyPair};

/// Most devices one list may hold.
pub const MAX_DEVICES: usize = 16;
/// Label of the account id hash.
pub const ACCOUNT_LABEL: &[u8] = b"cubbyhole/v1 account";
/// Prefix of the message a device signs for a device list.
pub const LIST_SIGNATURE_LABEL: &[u8] = b"cubbyhole/v1 device list";
/// Label of the hash that chains a list to its predecessor.
pub const LIST_HASH_LABEL: &[u8] = b"cubbyhole/v1 device list hash";
/// Label of the account fingerprint (SPEC.md 25.8).
pub const ACCOUNT_FINGERPRINT_LABEL: &[u8] = b"cubbyhole/v1 account fingerprint";
/// The format byte of a device list body.
pub const FORMAT: u8 = 0x01;

/// Length of the body before the entries.
const HEADER_LEN: usize = 1 + 32 + 8 + 32 + 1;
/// Length of one entry.
const ENTRY_LEN: usize = 32 + 4;
/// Length of one signature record.
const SIGNATURE_LEN: usize = 1 + 64;

/// The name of an account: SHA-256 of a label and the identity key of the
/// device that founded it. A name, not a key: it stays when the founder is
/// removed, and it authorizes nothing by itself.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountId(pub [u8; 32]);

impl AccountId {
    /// `SHA-256(ACCOUNT_LABEL || IK_founder)`.
    pub fn of_founder(founder: &IdentityKey) -> Self {
        AccountId(
            Sha256::new()
                .chain_update(ACCOUNT_LABEL)
                .chain_update(founder.as_bytes())
                .finalize()
                .into(),
        )
    }

    /// The 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for AccountId {
    /// Lowercase hex, two digits per byte.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AccountId({self})")
    }
}

impl core::str::FromStr for AccountId {
    type Err = DeviceListError;
    /// Exactly the `Display` form: 64 lowercase hex digits
    /// ([`DeviceListError::Malformed`] otherwise).
    fn from_str(s: &str) -> Result<Self, DeviceListError> {
        let digits = s.as_bytes();
        if digits.len() != 64 {
            return Err(DeviceListError::Malformed);
        }
        let mut out = [0u8; 32];
        for (o, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
            let mut v = 0u8;
            for c in pair {
                let d = match c {
                    b'0'..=b'9' => c - b'0',
                    b'a'..=b'f' => c - b'a' + 10,
                    _ => return Err(DeviceListError::Malformed),
                };
                v = (v << 4) | d;
            }
            *o = v;
        }
        Ok(AccountId(out))
    }
}

/// One device of an account: its identity key and its device number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DeviceEntry {
    /// The device's v1 identity key.
    pub identity: IdentityKey,
    /// The device number (distinct within a list, never reused for another
    /// key by the next version).
    pub device_id: u32,
}

/// Why a device list was refused. [`DeviceListError::profile_kind`] gives
/// the error kind of SPEC.md 25.6.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeviceListError {
    /// Not a well-formed device list (or account id text).
    Malformed,
    /// Offered as the first version but is not one: version is not 1,
    /// previous is not zero, or it lists more than one device.
    NotGenesis,
    /// The list names another account (or, for a first version, an
    /// account id that is not the founder's).
    WrongAccount,
    /// The version is not above the one held.
    Stale,
    /// The version skips versions: the chain in between is missing.
    Gap,
    /// Two versions that cannot both be true: a list signed by devices the
    /// verifier trusts that does not extend the list it holds, or another
    /// list of the version it holds. Both are kept as evidence; never
    /// resolve it silently.
    Conflict {
        /// The list the verifier holds.
        ours: Box<DeviceList>,
        /// The list offered.
        theirs: Box<DeviceList>,
    },
    /// A signature does not verify (strict Ed25519).
    BadSignature,
    /// A device kept from the previous version has another device id.
    DeviceIdChanged,
    /// A newly added device uses the device id of a device of the previous
    /// version.
    DeviceIdReused,
    /// No device of the previous version signed, an added device did not
    /// sign, or (building) the signer is not listed.
    Unauthorized,
}

impl DeviceListError {
    /// The implementation-neutral error kind (SPEC.md 25.6; the `error`
    /// field of `devices.json`).
    pub fn profile_kind(&self) -> &'static str {
        match self {
            DeviceListError::Malformed => "malformed",
            DeviceListError::NotGenesis => "not_genesis",
            DeviceListError::WrongAccount => "wrong_account",
            DeviceListError::Stale => "stale",
            DeviceListError::Gap => "gap",
            DeviceListError::Conflict { .. } => "conflict",
            DeviceListError::BadSignature => "bad_signature",
            DeviceListError::DeviceIdChanged => "device_id_changed",
            DeviceListError::DeviceIdReused => "device_id_reused",
            DeviceListError::Unauthorized => "unauthorized",
        }
    }
}

impl fmt::Display for DeviceListError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceListError::Malformed => "malformed device list",
            DeviceListError::NotGenesis => "not a first device list version",
            DeviceListError::WrongAccount => "device list of another account",
            DeviceListError::Stale => "device list version not above the one held",
            DeviceListError::Gap => "device list versions missing in between",
            DeviceListError::Conflict { .. } => "conflicting device lists (account compromised?)",
            DeviceListError::BadSignature => "device list signature does not verify",
            DeviceListError::DeviceIdChanged => "a kept device changed its device id",
            DeviceListError::DeviceIdReused => "an added device reuses a device id",
            DeviceListError::Unauthorized => "device list not signed by the devices it must be",
        })
    }
}

#[cfg(feature = "std")]
impl std::error::Error for DeviceListError {}

/// The signed part of a list, decoded, with its encoding and hash.
#[derive(Clone, PartialEq, Eq)]
struct Body {
    account: AccountId,
    version: u64,
    previous: [u8; 32],
    devices: Vec<DeviceEntry>,
    bytes: Vec<u8>,
    hash: [u8; 32],
}

impl Body {
    /// Builds a body from its fields; the devices are sorted by IK.
    fn new(
        account: AccountId,
        version: u64,
        previous: [u8; 32],
        devices: &[DeviceEntry],
    ) -> Result<Self, DeviceListError> {
        if devices.is_empty() || devices.len() > MAX_DEVICES || version == 0 {
            return Err(DeviceListError::Malformed);
        }
        let mut devices = devices.to_vec();
        devices.sort_by(|a, b| a.identity.as_bytes().cmp(b.identity.as_bytes()));
        check_entries(&devices)?;
        Ok(Self::encode(account, version, previous, devices))
    }

    /// Encodes checked fields (1 ..= MAX_DEVICES devices in order).
    fn encode(
        account: AccountId,
        version: u64,
        previous: [u8; 32],
        devices: Vec<DeviceEntry>,
    ) -> Self {
        let mut bytes = Vec::with_capacity(HEADER_LEN + ENTRY_LEN * devices.len());
        bytes.push(FORMAT);
        bytes.extend_from_slice(&account.0);
        bytes.extend_from_slice(&version.to_be_bytes());
        bytes.extend_from_slice(&previous);
        bytes.push(devices.len() as u8); // <= MAX_DEVICES
        for d in &devices {
            bytes.extend_from_slice(d.identity.as_bytes());
            bytes.extend_from_slice(&d.device_id.to_be_bytes());
        }
        Body {
            account,
            version,
            previous,
            devices,
            hash: list_hash(&bytes),
            bytes,
        }
    }

    fn index_of(&self, identity: &IdentityKey) -> Option<usize> {
        self.devices.iter().position(|d| d.identity == *identity)
    }

    fn device(&self, identity: &IdentityKey) -> Option<&DeviceEntry> {
        self.devices.iter().find(|d| d.identity == *identity)
    }
}

/// IKs strictly increasing, device ids pairwise distinct.
fn check_entries(devices: &[DeviceEntry]) -> Result<(), DeviceListError> {
    for (i, d) in devices.iter().enumerate() {
        if let Some(next) = devices.get(i + 1) {
            if d.identity.as_bytes() >= next.identity.as_bytes() {
                return Err(DeviceListError::Malformed);
            }
        }
        if devices
            .iter()
            .skip(i + 1)
            .any(|e| e.device_id == d.device_id)
        {
            return Err(DeviceListError::Malformed);
        }
    }
    Ok(())
}

/// `SHA-256(LIST_HASH_LABEL || body)`.
pub fn list_hash(body: &[u8]) -> [u8; 32] {
    Sha256::new()
        .chain_update(LIST_HASH_LABEL)
        .chain_update(body)
        .finalize()
        .into()
}

/// The message a device signs: `LIST_SIGNATURE_LABEL || body`.
fn signed_message(body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(LIST_SIGNATURE_LABEL.len() + body.len());
    m.extend_from_slice(LIST_SIGNATURE_LABEL);
    m.extend_from_slice(body);
    m
}

/// Adds (or replaces) `signer`'s signature, kept in index order.
fn add_signature(
    body: &Body,
    signatures: &mut Vec<(u8, [u8; 64])>,
    signer: &IdentityKeyPair,
) -> Result<(), DeviceListError> {
    let index = body
        .index_of(signer.public())
        .ok_or(DeviceListError::Unauthorized)? as u8; // < MAX_DEVICES
    let signature = signer.sign(&signed_message(&body.bytes));
    match signatures.binary_search_by_key(&index, |(i, _)| *i) {
        Ok(at) => {
            if let Some(slot) = signatures.get_mut(at) {
                slot.1 = signature;
            }
        }
        Err(at) => signatures.insert(at, (index, signature)),
    }
    Ok(())
}

/// A decoded device list: well formed, nothing verified.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceList {
    body: Body,
    signatures: Vec<(u8, [u8; 64])>,
}

impl DeviceList {
    /// The first version of a new account: `founder` alone,
    /// with device number `device_id`, signed by it.
    pub fn genesis(founder: &IdentityKeyPair, device_id: u32) -> DeviceList {
        let entry = DeviceEntry {
            identity: *founder.public(),
            device_id,
        };
        let account = AccountId::of_founder(founder.public());
        let body = Body::encode(account, 1, [0; 32], alloc::vec![entry]);
        let mut signatures = Vec::with_capacity(1);
        let signature = founder.sign(&signed_message(&body.bytes));
        signatures.push((0, signature));
        DeviceList { body, signatures }
    }

    /// The (identity key bytes, device number) entries of a list that was
    /// decoded and verified before and kept in trusted storage, read
    /// without decoding the keys again (the costly part of
    /// [`DeviceList::decode`]). `None` if the bytes do not have a list's
    /// layout. Never use it on bytes from outside.
    #[cfg(feature = "std")]
    pub(crate) fn stored_entries(bytes: &[u8]) -> Option<Vec<([u8; 32], u32)>> {
        if *bytes.first()? != FORMAT {
            return None;
        }
        let count = usize::from(*bytes.get(HEADER_LEN - 1)?);
        if count == 0 || count > MAX_DEVICES {
            return None;
        }
        let entries = bytes.get(HEADER_LEN..HEADER_LEN + ENTRY_LEN * count)?;
        entries
            .chunks_exact(ENTRY_LEN)
            .map(|e| {
                let ik: [u8; 32] = e.get(..32)?.try_into().ok()?;
                let id: [u8; 4] = e.get(32..)?.try_into().ok()?;
                Some((ik, u32::from_be_bytes(id)))
            })
            .collect()
    }

    /// Parses untrusted bytes (SPEC.md 25.4). Pure parsing: signatures and
    /// the chain are checked by the `verify_*` methods.
    ///
    /// # Errors
    /// [`DeviceListError::Malformed`].
    pub fn decode(bytes: &[u8]) -> Result<Self, DeviceListError> {
        use DeviceListError::Malformed;
        // 1. The header, the format byte.
        let header = bytes.get(..HEADER_LEN).ok_or(Malformed)?;
        let (&format, rest) = header.split_first().ok_or(Malformed)?;
        if format != FORMAT {
            return Err(Malformed);
        }
        let (account, rest) = rest.split_at_checked(32).ok_or(Malformed)?;
        let (version, rest) = rest.split_at_checked(8).ok_or(Malformed)?;
        let (previous, rest) = rest.split_at_checked(32).ok_or(Malformed)?;
        let count = usize::from(*rest.first().ok_or(Malformed)?);
        // 2. count, the body's length, the version.
        if count == 0 || count > MAX_DEVICES {
            return Err(Malformed);
        }
        let body_len = HEADER_LEN + ENTRY_LEN * count;
        if bytes.len() < body_len + 1 {
            return Err(Malformed);
        }
        let version = u64::from_be_bytes(version.try_into().map_err(|_| Malformed)?);
        if version == 0 {
            return Err(Malformed);
        }
        // 3. The entries.
        let body_bytes = bytes.get(..body_len).ok_or(Malformed)?;
        let entries = body_bytes.get(HEADER_LEN..).ok_or(Malformed)?;
        let mut devices = Vec::with_capacity(count);
        for entry in entries.chunks_exact(ENTRY_LEN) {
            let (ik, id) = entry.split_at_checked(32).ok_or(Malformed)?;
            let identity = IdentityKey::from_bytes(ik).map_err(|_| Malformed)?;
            let device_id = u32::from_be_bytes(id.try_into().map_err(|_| Malformed)?);
            devices.push(DeviceEntry {
                identity,
                device_id,
            });
        }
        check_entries(&devices)?;
        // 4. The signatures.
        let sigs = bytes.get(body_len..).ok_or(Malformed)?;
        let (&sig_count, sigs) = sigs.split_first().ok_or(Malformed)?;
        let sig_count = usize::from(sig_count);
        if sig_count == 0 || sig_count > count || sigs.len() != SIGNATURE_LEN * sig_count {
            return Err(Malformed);
        }
        let mut signatures: Vec<(u8, [u8; 64])> = Vec::with_capacity(sig_count);
        for record in sigs.chunks_exact(SIGNATURE_LEN) {
            let (&index, signature) = record.split_first().ok_or(Malformed)?;
            if usize::from(index) >= count || signatures.last().is_some_and(|(i, _)| *i >= index) {
                return Err(Malformed);
            }
            signatures.push((index, signature.try_into().map_err(|_| Malformed)?));
        }
        Ok(DeviceList {
            body: Body {
                account: AccountId(account.try_into().map_err(|_| Malformed)?),
                version,
                previous: previous.try_into().map_err(|_| Malformed)?,
                devices,
                hash: list_hash(body_bytes),
                bytes: body_bytes.to_vec(),
            },
            signatures,
        })
    }

    /// The signed encoding: body, signature count, signatures.
    pub fn encode(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(self.body.bytes.len() + 1 + SIGNATURE_LEN * self.signatures.len());
        out.extend_from_slice(&self.body.bytes);
        out.push(self.signatures.len() as u8); // <= MAX_DEVICES
        for (index, signature) in &self.signatures {
            out.push(*index);
            out.extend_from_slice(signature);
        }
        out
    }

    /// The account this list belongs to.
    pub fn account_id(&self) -> &AccountId {
        &self.body.account
    }
    /// The version (1 for the first).
    pub fn version(&self) -> u64 {
        self.body.version
    }
    /// `list_hash` of the previous version's body (zero for version 1).
    pub fn previous(&self) -> &[u8; 32] {
        &self.body.previous
    }
    /// The devices, in the list's order (by identity key bytes).
    pub fn devices(&self) -> &[DeviceEntry] {
        &self.body.devices
    }
    /// Whether `identity` is listed, and with which device number.
    pub fn device(&self, identity: &IdentityKey) -> Option<&DeviceEntry> {
        self.body.device(identity)
    }
    /// The devices whose signatures the list carries, in index order.
    pub fn signers(&self) -> impl Iterator<Item = &DeviceEntry> + '_ {
        self.signatures
            .iter()
            .filter_map(|(i, _)| self.body.devices.get(usize::from(*i)))
    }
    /// The signatures: (index of the signer in [`Self::devices`], Ed25519
    /// signature), in index order.
    pub fn signatures(&self) -> &[(u8, [u8; 64])] {
        &self.signatures
    }
    /// The body's encoding (what is signed, after the label, and hashed).
    pub fn body(&self) -> &[u8] {
        &self.body.bytes
    }
    /// `list_hash(body)`: the next version's `previous`.
    pub fn body_hash(&self) -> &[u8; 32] {
        &self.body.hash
    }

    /// Adds `signer`'s signature (a countersignature: an added device signs
    /// the list that adds it). Replaces a signature of the same device.
    ///
    /// # Errors
    /// [`DeviceListError::Unauthorized`] if `signer` is not listed.
    pub fn sign(&mut self, signer: &IdentityKeyPair) -> Result<(), DeviceListError> {
        add_signature(&self.body, &mut self.signatures, signer)
    }

    /// Every carried signature verifies (strict Ed25519) under the listed
    /// key at its index.
    fn check_signatures(&self) -> Result<(), DeviceListError> {
        let message = signed_message(&self.body.bytes);
        for (index, signature) in &self.signatures {
            let signer = self
                .body
                .devices
                .get(usize::from(*index))
                .ok_or(DeviceListError::Malformed)?;
            signer
                .identity
                .verify_strict(&message, signature)
                .map_err(|_| DeviceListError::BadSignature)?;
        }
        Ok(())
    }

    /// Whether any signer of this list is a device of `other`.
    fn signed_by_a_device_of(&self, other: &DeviceList) -> bool {
        self.signers()
            .any(|s| other.body.device(&s.identity).is_some())
    }

    /// Verifies a first version (SPEC.md 25.5): version 1, previous zero
    /// and one device ([`DeviceListError::NotGenesis`]); the account id is
    /// that device's ([`DeviceListError::WrongAccount`]); the signature
    /// ([`DeviceListError::BadSignature`]).
    ///
    /// # Errors
    /// As listed, the first failing check.
    pub fn verify_genesis(&self) -> Result<VerifiedDeviceList, DeviceListError> {
        let founder = match self.body.devices.as_slice() {
            [founder] if self.body.version == 1 && self.body.previous == [0; 32] => founder,
            _ => return Err(DeviceListError::NotGenesis),
        };
        if AccountId::of_founder(&founder.identity) != self.body.account {
            return Err(DeviceListError::WrongAccount);
        }
        self.check_signatures()?;
        Ok(VerifiedDeviceList {
            list: self.clone(),
            parent: None,
        })
    }

    /// Verifies this list as the version after `prev` (SPEC.md 25.5).
    ///
    /// # Errors
    /// The first failing check, in this order: [`DeviceListError::WrongAccount`];
    /// [`DeviceListError::Stale`] / [`DeviceListError::Gap`];
    /// [`DeviceListError::BadSignature`]; `previous` is not `prev`'s hash:
    /// [`DeviceListError::Conflict`] if a device of `prev` signed it, else
    /// [`DeviceListError::Unauthorized`]; [`DeviceListError::DeviceIdChanged`],
    /// [`DeviceListError::DeviceIdReused`]; [`DeviceListError::Unauthorized`]
    /// (no device of `prev` signed, or an added device did not sign).
    pub fn verify_successor(
        &self,
        prev: &VerifiedDeviceList,
    ) -> Result<VerifiedDeviceList, DeviceListError> {
        self.successor_checks(&prev.list)?;
        Ok(VerifiedDeviceList {
            list: self.clone(),
            parent: Some(Box::new(prev.list.clone())),
        })
    }

    /// The checks of [`Self::verify_successor`] against a list the caller
    /// trusts (the relay's directory uses it on lists it verified when it
    /// stored them, so that a request costs at most one list's signature
    /// checks).
    pub(crate) fn successor_checks(&self, prev: &DeviceList) -> Result<(), DeviceListError> {
        // 1. The account.
        if self.body.account != prev.body.account {
            return Err(DeviceListError::WrongAccount);
        }
        // 2. The version.
        match prev.body.version.checked_add(1) {
            Some(next) if self.body.version == next => {}
            Some(next) if self.body.version > next => return Err(DeviceListError::Gap),
            _ => return Err(DeviceListError::Stale),
        }
        // 3. The signatures.
        self.check_signatures()?;
        // 4. The chain.
        if self.body.previous != prev.body.hash {
            if self.signed_by_a_device_of(prev) {
                return Err(DeviceListError::Conflict {
                    ours: Box::new(prev.clone()),
                    theirs: Box::new(self.clone()),
                });
            }
            return Err(DeviceListError::Unauthorized);
        }
        // 5. Device numbers.
        for d in &self.body.devices {
            match prev.body.device(&d.identity) {
                Some(kept) if kept.device_id != d.device_id => {
                    return Err(DeviceListError::DeviceIdChanged)
                }
                Some(_) => {}
                None => {
                    if prev.body.devices.iter().any(|p| p.device_id == d.device_id) {
                        return Err(DeviceListError::DeviceIdReused);
                    }
                }
            }
        }
        // 6. A device of the previous version signed.
        if !self.signed_by_a_device_of(prev) {
            return Err(DeviceListError::Unauthorized);
        }
        // 7. Every added device signed.
        for (index, d) in self.body.devices.iter().enumerate() {
            let added = prev.body.device(&d.identity).is_none();
            if added
                && !self
                    .signatures
                    .iter()
                    .any(|(i, _)| usize::from(*i) == index)
            {
                return Err(DeviceListError::Unauthorized);
            }
        }
        Ok(())
    }

    /// Trust on first use: takes this list as an account's current list
    /// without a chain to it, after checking only that its signatures
    /// verify. For a contact met for the first time at a version above 1,
    /// or after a [`DeviceListError::Gap`] it cannot fill (SPEC.md 25.7):
    /// the account is then unvalidated.
    ///
    /// # Errors
    /// [`DeviceListError::BadSignature`].
    pub fn accept_unverified(&self) -> Result<VerifiedDeviceList, DeviceListError> {
        self.check_signatures()?;
        Ok(VerifiedDeviceList {
            list: self.clone(),
            parent: None,
        })
    }
}

impl fmt::Debug for DeviceList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceList")
            .field("account_id", &self.body.account)
            .field("version", &self.body.version)
            .field("devices", &self.body.devices)
            .field(
                "signers",
                &self.signatures.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// A device list under construction, not yet signed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnsignedDeviceList {
    list: DeviceList,
}

impl UnsignedDeviceList {
    /// A list with the given fields; the devices are put in the list's
    /// order. Low level: [`VerifiedDeviceList::successor`] fills in the
    /// account, version and previous hash. Nothing but the structure is
    /// checked; verification decides whether the list is valid.
    ///
    /// # Errors
    /// [`DeviceListError::Malformed`]: no device or more than
    /// [`MAX_DEVICES`], version 0, an identity key or a device number twice.
    pub fn new(
        account: AccountId,
        version: u64,
        previous: [u8; 32],
        devices: &[DeviceEntry],
    ) -> Result<Self, DeviceListError> {
        Ok(UnsignedDeviceList {
            list: DeviceList {
                body: Body::new(account, version, previous, devices)?,
                signatures: Vec::new(),
            },
        })
    }

    /// Signs the list with a listed device's identity key (again: replaces
    /// its signature).
    ///
    /// # Errors
    /// [`DeviceListError::Unauthorized`] if `signer` is not listed.
    pub fn sign(&mut self, signer: &IdentityKeyPair) -> Result<(), DeviceListError> {
        self.list.sign(signer)
    }

    /// The list's body (what is signed, after the label).
    pub fn body(&self) -> &[u8] {
        self.list.body()
    }

    /// The signed list.
    ///
    /// # Errors
    /// [`DeviceListError::Unauthorized`] if nobody signed it.
    pub fn into_list(self) -> Result<DeviceList, DeviceListError> {
        if self.list.signatures.is_empty() {
            return Err(DeviceListError::Unauthorized);
        }
        Ok(self.list)
    }
}

/// A device list that passed verification: a first version, a successor of
/// a verified list, or a list taken on first use
/// ([`DeviceList::accept_unverified`]). Holds the verified list and, for a
/// successor, the list it succeeded (to tell a conflicting list of the same
/// version from a forgery).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedDeviceList {
    list: DeviceList,
    parent: Option<Box<DeviceList>>,
}

impl VerifiedDeviceList {
    /// The verified list.
    pub fn list(&self) -> &DeviceList {
        &self.list
    }

    /// The list it was verified as the successor of, if any.
    pub fn parent(&self) -> Option<&DeviceList> {
        self.parent.as_deref()
    }

    /// The next version's unsigned list, listing `devices`: same account,
    /// version + 1, previous = this body's hash. Sign it with a device kept
    /// from this version and with every added device.
    ///
    /// # Errors
    /// [`DeviceListError::Malformed`] as [`UnsignedDeviceList::new`];
    /// [`DeviceListError::Stale`] if the version cannot grow.
    pub fn successor(
        &self,
        devices: &[DeviceEntry],
    ) -> Result<UnsignedDeviceList, DeviceListError> {
        let version = self
            .list
            .body
            .version
            .checked_add(1)
            .ok_or(DeviceListError::Stale)?;
        UnsignedDeviceList::new(
            self.list.body.account,
            version,
            self.list.body.hash,
            devices,
        )
    }
}

impl core::ops::Deref for VerifiedDeviceList {
    type Target = DeviceList;
    fn deref(&self) -> &DeviceList {
        &self.list
    }
}

/// What [`DeviceListChain::accept`] verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// The newly verified lists, oldest first; empty if nothing was new.
    pub new: Vec<VerifiedDeviceList>,
}

impl Accepted {
    /// The new head, if anything was new.
    pub fn head(&self) -> Option<&VerifiedDeviceList> {
        self.new.last()
    }
}

/// The contact side's verifier of offered lists (SPEC.md 25.7).
#[derive(Clone, Copy, Debug, Default)]
pub struct DeviceListChain;

impl DeviceListChain {
    /// Verifies `offered` (from the directory or in-band, any order) against
    /// the known head, version by version (SPEC.md 25.7): lists older than
    /// the head are skipped; of the lists of the next version, the first
    /// that passes [`DeviceList::verify_successor`] becomes the head (none:
    /// the first one's error); then a list with the head's version and the
    /// same body is skipped, one with another body is a
    /// [`DeviceListError::Conflict`] if it is authentic (it verifies
    /// against the head's parent, or as a first version, or, for a head
    /// without parent, carries valid signatures including one of a device
    /// of the head), else that check's error; a version further on is a
    /// [`DeviceListError::Gap`]. With no known head the first version must
    /// be 1 (else [`DeviceListError::Gap`]). The outcome does not depend on
    /// the order of `offered` (only which error is reported when several
    /// lists fail).
    ///
    /// # Errors
    /// The first list's error, as above; what was verified before it is
    /// lost (call again with fewer lists to keep it).
    pub fn accept(
        known: Option<&VerifiedDeviceList>,
        offered: &[DeviceList],
    ) -> Result<Accepted, DeviceListError> {
        let mut order: Vec<&DeviceList> = offered.iter().collect();
        order.sort_by_key(|l| l.version());
        let mut new: Vec<VerifiedDeviceList> = Vec::new();
        for group in order.chunk_by(|a, b| a.version() == b.version()) {
            let Some(version) = group.first().map(|l| l.version()) else {
                continue;
            };
            match new.last().or(known) {
                None => {
                    if version != 1 {
                        return Err(DeviceListError::Gap);
                    }
                    new.push(Self::first_that(group, DeviceList::verify_genesis)?);
                }
                Some(head) => {
                    if group.iter().any(|l| l.account_id() != head.account_id()) {
                        return Err(DeviceListError::WrongAccount);
                    }
                    if version < head.version() {
                        continue;
                    }
                    if version > head.version().saturating_add(1) {
                        return Err(DeviceListError::Gap);
                    }
                    if version > head.version() {
                        let next = Self::first_that(group, |l| l.verify_successor(head))?;
                        new.push(next);
                    }
                }
            }
            // Every list of the group now has the head's version: the same
            // body is skipped, another body is a sibling.
            if let Some(head) = new.last().or(known) {
                if let Some(other) = group.iter().find(|l| l.body() != head.body()) {
                    return Err(Self::sibling(head, other));
                }
            }
        }
        Ok(Accepted { new })
    }

    /// The first list of `group` (in the order offered) that `check`
    /// accepts, else the first list's error.
    fn first_that(
        group: &[&DeviceList],
        check: impl Fn(&DeviceList) -> Result<VerifiedDeviceList, DeviceListError>,
    ) -> Result<VerifiedDeviceList, DeviceListError> {
        let mut first_error = None;
        for list in group {
            match check(list) {
                Ok(verified) => return Ok(verified),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or(DeviceListError::Gap))
    }

    /// The error for `list`, of the head's version with another body.
    fn sibling(head: &VerifiedDeviceList, list: &DeviceList) -> DeviceListError {
        let authentic = match head.parent() {
            Some(parent) => match list.successor_checks(parent) {
                Ok(()) | Err(DeviceListError::Conflict { .. }) => Ok(()),
                Err(e) => Err(e),
            },
            None if head.version() == 1 => list.verify_genesis().map(|_| ()),
            None => list.check_signatures().and_then(|()| {
                if list.signed_by_a_device_of(&head.list) {
                    Ok(())
                } else {
                    Err(DeviceListError::Unauthorized)
                }
            }),
        };
        match authentic {
            Ok(()) => DeviceListError::Conflict {
                ours: Box::new(head.list.clone()),
                theirs: Box::new(list.clone()),
            },
            Err(e) => e,
        }
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
mod tests {
    use super::*;
    use alloc::vec;

    fn key(n: u8) -> IdentityKeyPair {
        IdentityKeyPair::from_seed(&[n; 32])
    }

    fn entry(k: &IdentityKeyPair, device_id: u32) -> DeviceEntry {
        DeviceEntry {
            identity: *k.public(),
            device_id,
        }
    }

    fn kind(r: Result<VerifiedDeviceList, DeviceListError>) -> &'static str {
        match r {
            Ok(_) => "ok",
            Err(e) => e.profile_kind(),
        }
    }

    fn signed(unsigned: UnsignedDeviceList, signers: &[&IdentityKeyPair]) -> DeviceList {
        let mut u = unsigned;
        for s in signers {
            u.sign(s).unwrap();
        }
        u.into_list().unwrap()
    }

    /// A (founder, 1), B (2) and C (3): genesis, then v2 = {A, B} signed by
    /// A and B.
    struct Chain {
        a: IdentityKeyPair,
        b: IdentityKeyPair,
        c: IdentityKeyPair,
        v1: VerifiedDeviceList,
        v2: VerifiedDeviceList,
    }

    fn chain() -> Chain {
        let (a, b, c) = (key(1), key(2), key(3));
        let v1 = DeviceList::genesis(&a, 1).verify_genesis().unwrap();
        let v2 = signed(
            v1.successor(&[entry(&a, 1), entry(&b, 2)]).unwrap(),
            &[&a, &b],
        );
        let v2 = v2.verify_successor(&v1).unwrap();
        Chain { a, b, c, v1, v2 }
    }

    #[test]
    fn genesis_layout_written_out() {
        let a = key(1);
        let list = DeviceList::genesis(&a, 7);
        let bytes = list.encode();
        let account: [u8; 32] = Sha256::new()
            .chain_update(b"cubbyhole/v1 account")
            .chain_update(a.public().as_bytes())
            .finalize()
            .into();
        let mut body = vec![0x01];
        body.extend_from_slice(&account);
        body.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1]);
        body.extend_from_slice(&[0; 32]);
        body.push(1);
        body.extend_from_slice(a.public().as_bytes());
        body.extend_from_slice(&[0, 0, 0, 7]);
        assert_eq!(body.len(), 74 + 36);
        assert_eq!(&bytes[..body.len()], &body[..]);
        assert_eq!(bytes.len(), body.len() + 1 + 65);
        assert_eq!(bytes[body.len()], 1);
        assert_eq!(bytes[body.len() + 1], 0);
        let mut message = b"cubbyhole/v1 device list".to_vec();
        message.extend_from_slice(&body);
        let sig: [u8; 64] = bytes[body.len() + 2..].try_into().unwrap();
        a.public().verify_strict(&message, &sig).unwrap();
        let hash: [u8; 32] = Sha256::new()
            .chain_update(b"cubbyhole/v1 device list hash")
            .chain_update(&body)
            .finalize()
            .into();
        assert_eq!(list.body_hash(), &hash);
        assert_eq!(list.account_id().0, account);
        assert_eq!(DeviceList::decode(&bytes).unwrap(), list);
        let v = list.verify_genesis().unwrap();
        assert_eq!(v.version(), 1);
        assert_eq!(v.devices(), &[entry(&a, 7)]);
        assert!(v.parent().is_none());
    }

    #[test]
    fn successor_round_trip_and_order() {
        let c = chain();
        let bytes = c.v2.encode();
        let decoded = DeviceList::decode(&bytes).unwrap();
        assert_eq!(&decoded, c.v2.list());
        assert_eq!(decoded.previous(), c.v1.body_hash());
        assert_eq!(decoded.version(), 2);
        // Entries sorted by IK bytes.
        let ids: Vec<_> = decoded
            .devices()
            .iter()
            .map(|d| *d.identity.as_bytes())
            .collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted);
        assert_eq!(decoded.signers().count(), 2);
        assert_eq!(c.v2.parent(), Some(c.v1.list()));
    }

    /// A valid two-device list, signed by both: the base of the decode cases.
    fn two_signed() -> Vec<u8> {
        chain().v2.encode()
    }

    const BODY2: usize = 74 + 2 * 36;

    #[test]
    fn decode_checks() {
        let good = two_signed();
        assert!(DeviceList::decode(&good).is_ok());
        let malformed = |bytes: Vec<u8>, what: &str| {
            assert_eq!(
                DeviceList::decode(&bytes),
                Err(DeviceListError::Malformed),
                "{what}"
            );
        };
        // 1.
        malformed(vec![], "empty");
        malformed(good[..73].to_vec(), "short header");
        let mut b = good.clone();
        b[0] = 0x02;
        malformed(b, "format");
        // 2.
        let mut b = good.clone();
        b[73] = 0;
        malformed(b, "count 0");
        let mut b = good.clone();
        b[73] = 17;
        b.resize(74 + 17 * 36 + 1 + 65, 0);
        malformed(b, "count 17");
        malformed(good[..BODY2].to_vec(), "no signature count");
        let mut b = good.clone();
        b[33..41].copy_from_slice(&[0; 8]);
        malformed(b, "version 0");
        // 3.
        let mut b = good.clone();
        b[74..106].copy_from_slice(&[0; 32]); // small order
        malformed(b, "invalid IK");
        let mut b = good.clone();
        let (first, second) = (b[74..110].to_vec(), b[110..146].to_vec());
        b[74..110].copy_from_slice(&second);
        b[110..146].copy_from_slice(&first);
        malformed(b, "IKs not increasing");
        let mut b = good.clone();
        let first = b[74..110].to_vec();
        b[110..146].copy_from_slice(&first);
        malformed(b, "IK twice");
        let mut b = good.clone();
        let id = b[106..110].to_vec();
        b[142..146].copy_from_slice(&id);
        malformed(b, "device id twice");
        // 4.
        let mut b = good.clone();
        b[BODY2] = 0;
        b.truncate(BODY2 + 1);
        malformed(b, "sig_count 0");
        let mut b = good.clone();
        b[BODY2] = 3;
        b.extend_from_slice(&[2; 65]);
        malformed(b, "sig_count above count");
        let mut b = good.clone();
        b.push(0);
        malformed(b, "trailing byte");
        malformed(good[..good.len() - 1].to_vec(), "truncated signature");
        let mut b = good.clone();
        b[BODY2 + 1 + 65] = 0;
        malformed(b, "index twice");
        let mut b = good.clone();
        b[BODY2 + 1] = 1;
        b[BODY2 + 1 + 65] = 0;
        malformed(b, "indices decreasing");
        let mut b = good.clone();
        b[BODY2 + 1 + 65] = 2;
        malformed(b, "index not below count");
    }

    #[test]
    fn every_truncation_and_bit_flip_is_refused() {
        let c = chain();
        let good = c.v2.encode();
        for len in 0..good.len() {
            assert_eq!(
                DeviceList::decode(&good[..len]),
                Err(DeviceListError::Malformed),
                "truncated to {len}"
            );
        }
        for bit in 0..good.len() * 8 {
            let mut b = good.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            let verified = DeviceList::decode(&b).and_then(|l| l.verify_successor(&c.v1));
            assert!(verified.is_err(), "bit {bit} flipped, still verifies");
        }
    }

    #[test]
    fn genesis_checks_in_order() {
        let (a, b) = (key(1), key(2));
        let account = AccountId::of_founder(a.public());
        let make = |account, version, previous, devices: &[DeviceEntry]| {
            signed(
                UnsignedDeviceList::new(account, version, previous, devices).unwrap(),
                &[&a],
            )
        };
        let good = make(account, 1, [0; 32], &[entry(&a, 1)]);
        assert_eq!(kind(good.verify_genesis()), "ok");
        assert_eq!(
            kind(make(account, 2, [0; 32], &[entry(&a, 1)]).verify_genesis()),
            "not_genesis"
        );
        assert_eq!(
            kind(make(account, 1, [9; 32], &[entry(&a, 1)]).verify_genesis()),
            "not_genesis"
        );
        assert_eq!(
            kind(make(account, 1, [0; 32], &[entry(&a, 1), entry(&b, 2)]).verify_genesis()),
            "not_genesis"
        );
        let other = AccountId::of_founder(b.public());
        assert_eq!(
            kind(make(other, 1, [0; 32], &[entry(&a, 1)]).verify_genesis()),
            "wrong_account"
        );
        // Signed by another key at index 0: bad signature.
        let mut bytes = good.encode();
        let last = bytes.len() - 1;
        bytes[last - 40] ^= 1;
        assert_eq!(
            kind(DeviceList::decode(&bytes).unwrap().verify_genesis()),
            "bad_signature"
        );
        // Order: a not-genesis list of another account is not_genesis.
        assert_eq!(
            kind(make(other, 2, [0; 32], &[entry(&a, 1)]).verify_genesis()),
            "not_genesis"
        );
        // Order: wrong account before the signature.
        let forged = make(other, 1, [0; 32], &[entry(&a, 1)]);
        let mut bytes = forged.encode();
        let last = bytes.len() - 1;
        bytes[last - 40] ^= 1;
        assert_eq!(
            kind(DeviceList::decode(&bytes).unwrap().verify_genesis()),
            "wrong_account"
        );
    }

    #[test]
    fn successor_checks_in_order() {
        let Chain {
            a,
            b,
            c: cc,
            v1,
            v2,
        } = chain();
        let d = key(4);
        let account = *v2.account_id();
        let next = |devices: &[DeviceEntry], signers: &[&IdentityKeyPair]| {
            signed(v2.successor(devices).unwrap(), signers)
        };
        let custom =
            |account, version, previous, devices: &[DeviceEntry], signers: &[&IdentityKeyPair]| {
                signed(
                    UnsignedDeviceList::new(account, version, previous, devices).unwrap(),
                    signers,
                )
            };
        // Valid: remove B (signed by A); add C (signed by A and C); add two.
        assert_eq!(
            kind(next(&[entry(&a, 1)], &[&a]).verify_successor(&v2)),
            "ok"
        );
        assert_eq!(
            kind(
                next(&[entry(&a, 1), entry(&b, 2), entry(&cc, 3)], &[&b, &cc])
                    .verify_successor(&v2)
            ),
            "ok"
        );
        assert_eq!(
            kind(
                next(
                    &[entry(&a, 1), entry(&b, 2), entry(&cc, 3), entry(&d, 4)],
                    &[&a, &cc, &d]
                )
                .verify_successor(&v2)
            ),
            "ok"
        );
        // A removed device may not sign (it is not listed): building refuses.
        let mut u = v2.successor(&[entry(&a, 1)]).unwrap();
        assert_eq!(u.sign(&b), Err(DeviceListError::Unauthorized));
        // 1. account.
        let other = AccountId::of_founder(d.public());
        assert_eq!(
            kind(custom(other, 3, *v2.body_hash(), &[entry(&a, 1)], &[&a]).verify_successor(&v2)),
            "wrong_account"
        );
        // 2. version.
        assert_eq!(
            kind(custom(account, 2, *v2.body_hash(), &[entry(&a, 1)], &[&a]).verify_successor(&v2)),
            "stale"
        );
        assert_eq!(
            kind(custom(account, 1, *v2.body_hash(), &[entry(&a, 1)], &[&a]).verify_successor(&v2)),
            "stale"
        );
        assert_eq!(
            kind(custom(account, 4, *v2.body_hash(), &[entry(&a, 1)], &[&a]).verify_successor(&v2)),
            "gap"
        );
        // Order: stale before the signature.
        let mut stale = custom(account, 2, [5; 32], &[entry(&a, 1)], &[&a]).encode();
        let n = stale.len();
        stale[n - 10] ^= 1;
        assert_eq!(
            kind(DeviceList::decode(&stale).unwrap().verify_successor(&v2)),
            "stale"
        );
        // 3. signatures.
        let mut bad = next(&[entry(&a, 1)], &[&a]).encode();
        let n = bad.len();
        bad[n - 10] ^= 1;
        assert_eq!(
            kind(DeviceList::decode(&bad).unwrap().verify_successor(&v2)),
            "bad_signature"
        );
        // Order: a bad signature before the chain (a forged "conflict").
        let mut forged = custom(account, 3, [5; 32], &[entry(&a, 1)], &[&a]).encode();
        let n = forged.len();
        forged[n - 10] ^= 1;
        assert_eq!(
            kind(DeviceList::decode(&forged).unwrap().verify_successor(&v2)),
            "bad_signature"
        );
        // 4. previous: signed by a device of v2 -> conflict, with evidence.
        let fork = custom(account, 3, [5; 32], &[entry(&a, 1)], &[&a]);
        match fork.verify_successor(&v2) {
            Err(DeviceListError::Conflict { ours, theirs }) => {
                assert_eq!(&*ours, v2.list());
                assert_eq!(*theirs, fork);
            }
            other => panic!("expected a conflict, got {other:?}"),
        }
        // ... by nobody of v2 -> unauthorized (a stranger cannot raise one).
        assert_eq!(
            kind(custom(account, 3, [5; 32], &[entry(&d, 9)], &[&d]).verify_successor(&v2)),
            "unauthorized"
        );
        // 5. device ids.
        assert_eq!(
            kind(next(&[entry(&a, 5), entry(&b, 2)], &[&a]).verify_successor(&v2)),
            "device_id_changed"
        );
        assert_eq!(
            kind(next(&[entry(&a, 1), entry(&cc, 2)], &[&a, &cc]).verify_successor(&v2)),
            "device_id_reused"
        );
        // A removed device's number may not be given to a new key either.
        assert_eq!(
            kind(next(&[entry(&a, 1), entry(&cc, 2)], &[&a, &cc]).verify_successor(&v2)),
            "device_id_reused"
        );
        // Order: device ids before authorization (C unsigned as well).
        assert_eq!(
            kind(next(&[entry(&a, 1), entry(&cc, 2)], &[&a]).verify_successor(&v2)),
            "device_id_reused"
        );
        // 6. no kept device signed (C adds itself).
        assert_eq!(
            kind(next(&[entry(&a, 1), entry(&b, 2), entry(&cc, 3)], &[&cc]).verify_successor(&v2)),
            "unauthorized"
        );
        // 7. an added device did not sign.
        assert_eq!(
            kind(next(&[entry(&a, 1), entry(&b, 2), entry(&cc, 3)], &[&a]).verify_successor(&v2)),
            "unauthorized"
        );
        assert_eq!(
            kind(
                next(
                    &[entry(&a, 1), entry(&b, 2), entry(&cc, 3), entry(&d, 4)],
                    &[&a, &cc]
                )
                .verify_successor(&v2)
            ),
            "unauthorized"
        );
        // The genesis is no successor of anything.
        assert_eq!(kind(v1.list().verify_successor(&v2)), "stale");
    }

    #[test]
    fn stored_entries_read_the_entries_as_decode_does() {
        let Chain { v2, .. } = chain();
        let bytes = v2.encode();
        let expected: Vec<([u8; 32], u32)> = v2
            .devices()
            .iter()
            .map(|d| (*d.identity.as_bytes(), d.device_id))
            .collect();
        assert_eq!(expected.len(), 2);
        assert_eq!(DeviceList::stored_entries(&bytes), Some(expected));
        // Not a list's layout: None, never a panic.
        for cut in 0..crate::protocol::devices::HEADER_LEN + ENTRY_LEN {
            assert_eq!(DeviceList::stored_entries(&bytes[..cut]), None, "cut {cut}");
        }
        let mut other = bytes.clone();
        other[0] ^= 0xFF;
        assert_eq!(DeviceList::stored_entries(&other), None);
    }

    #[test]
    fn building() {
        let Chain { a, b, c, v2, .. } = chain();
        // Unsigned: refused.
        let u = v2.successor(&[entry(&a, 1)]).unwrap();
        assert_eq!(u.into_list(), Err(DeviceListError::Unauthorized));
        // Structure.
        assert_eq!(v2.successor(&[]), Err(DeviceListError::Malformed));
        assert_eq!(
            v2.successor(&[entry(&a, 1), entry(&b, 1)]),
            Err(DeviceListError::Malformed)
        );
        assert_eq!(
            v2.successor(&[entry(&a, 1), entry(&a, 2)]),
            Err(DeviceListError::Malformed)
        );
        let many: Vec<_> = (0..17u8)
            .map(|i| entry(&key(100 + i), u32::from(i)))
            .collect();
        assert_eq!(v2.successor(&many), Err(DeviceListError::Malformed));
        assert!(v2.successor(&many[..16]).is_ok());
        // Signing twice replaces; a countersignature is added in index order.
        let mut u = v2.successor(&[entry(&a, 1), entry(&c, 3)]).unwrap();
        u.sign(&a).unwrap();
        u.sign(&a).unwrap();
        let mut list = u.into_list().unwrap();
        assert_eq!(list.signatures().len(), 1);
        assert_eq!(kind(list.verify_successor(&v2)), "unauthorized");
        list.sign(&c).unwrap();
        assert_eq!(list.signatures().len(), 2);
        assert!(list.signatures()[0].0 < list.signatures()[1].0);
        let list = DeviceList::decode(&list.encode()).unwrap();
        assert_eq!(kind(list.verify_successor(&v2)), "ok");
    }

    #[test]
    fn chain_accepts_in_order_and_skips_what_it_has() {
        let Chain { a, b, c, v1, v2 } = chain();
        let v3 = signed(
            v2.successor(&[entry(&a, 1), entry(&b, 2), entry(&c, 3)])
                .unwrap(),
            &[&b, &c],
        );
        let offered = [
            v3.clone(),
            v1.list().clone(),
            v2.list().clone(),
            v2.list().clone(),
        ];
        let got = DeviceListChain::accept(None, &offered).unwrap();
        assert_eq!(got.new.len(), 3);
        assert_eq!(got.head().unwrap().list(), &v3);
        let got = DeviceListChain::accept(Some(&v2), &offered).unwrap();
        assert_eq!(got.new.len(), 1);
        let got =
            DeviceListChain::accept(Some(&v2), &[v1.list().clone(), v2.list().clone()]).unwrap();
        assert!(got.head().is_none());
        // Gap: without v2, v3 cannot be verified from v1, nor from nothing.
        assert_eq!(
            DeviceListChain::accept(Some(&v1), core::slice::from_ref(&v3)).unwrap_err(),
            DeviceListError::Gap
        );
        assert_eq!(
            DeviceListChain::accept(None, core::slice::from_ref(&v3)).unwrap_err(),
            DeviceListError::Gap
        );
        // Trust on first use of v3, then nothing newer.
        let tofu = v3.accept_unverified().unwrap();
        assert!(tofu.parent().is_none());
        assert!(DeviceListChain::accept(Some(&tofu), &[v3])
            .unwrap()
            .head()
            .is_none());
        // Another account.
        let other = DeviceList::genesis(&key(9), 1);
        assert_eq!(
            DeviceListChain::accept(Some(&v1), &[other]).unwrap_err(),
            DeviceListError::WrongAccount
        );
    }

    /// The thief's race: T (stolen) and A, B are in v2; T signs v3 = {T};
    /// A signs v3' = {A, B}. Whoever holds one and sees the other reports a
    /// conflict with both lists; a stranger's list of the same version is
    /// refused, not a conflict.
    #[test]
    fn thief_race_is_a_conflict() {
        let (a, b, t, x) = (key(1), key(2), key(3), key(4));
        let v1 = DeviceList::genesis(&a, 1).verify_genesis().unwrap();
        let v2 = signed(
            v1.successor(&[entry(&a, 1), entry(&b, 2), entry(&t, 3)])
                .unwrap(),
            &[&a, &b, &t],
        )
        .verify_successor(&v1)
        .unwrap();
        let thief = signed(v2.successor(&[entry(&t, 3)]).unwrap(), &[&t]);
        let honest = signed(v2.successor(&[entry(&a, 1), entry(&b, 2)]).unwrap(), &[&a]);
        let conflict = |ours: &DeviceList,
                        theirs: &DeviceList,
                        r: Result<Accepted, DeviceListError>| {
            match r {
                Err(DeviceListError::Conflict { ours: o, theirs: t }) => {
                    assert_eq!((&*o, &*t), (ours, theirs));
                }
                other => panic!("expected a conflict, got {other:?}"),
            }
        };
        conflict(
            &thief,
            &honest,
            DeviceListChain::accept(Some(&v2), &[thief.clone(), honest.clone()]),
        );
        let held_thief = thief.verify_successor(&v2).unwrap();
        conflict(
            &thief,
            &honest,
            DeviceListChain::accept(Some(&held_thief), core::slice::from_ref(&honest)),
        );
        let held_honest = honest.verify_successor(&v2).unwrap();
        conflict(
            &honest,
            &thief,
            DeviceListChain::accept(Some(&held_honest), core::slice::from_ref(&thief)),
        );
        // A stranger (the directory) forges a version 3 listing itself.
        let forged = signed(
            UnsignedDeviceList::new(*v2.account_id(), 3, *v2.body_hash(), &[entry(&x, 9)]).unwrap(),
            &[&x],
        );
        assert_eq!(
            DeviceListChain::accept(Some(&held_honest), core::slice::from_ref(&forged))
                .unwrap_err(),
            DeviceListError::Unauthorized
        );
        // A head taken on first use has no parent: a sibling must carry a
        // signature of one of the head's devices.
        let tofu = honest.accept_unverified().unwrap();
        assert_eq!(
            DeviceListChain::accept(Some(&tofu), &[forged]).unwrap_err(),
            DeviceListError::Unauthorized
        );
        let both = signed(
            v2.successor(&[entry(&a, 1), entry(&t, 3)]).unwrap(),
            &[&a, &t],
        );
        conflict(
            &honest,
            &both,
            DeviceListChain::accept(Some(&tofu), core::slice::from_ref(&both)),
        );
        // Two first versions of one founder.
        let g1 = DeviceList::genesis(&a, 1).verify_genesis().unwrap();
        let g2 = DeviceList::genesis(&a, 2);
        conflict(
            g1.list(),
            &g2,
            DeviceListChain::accept(Some(&g1), core::slice::from_ref(&g2)),
        );
    }

    #[test]
    fn account_id_text() {
        let id = AccountId::of_founder(key(1).public());
        let text = alloc::format!("{id}");
        assert_eq!(text.len(), 64);
        assert_eq!(text.parse::<AccountId>(), Ok(id));
        assert_eq!(
            text.to_uppercase().parse::<AccountId>(),
            Err(DeviceListError::Malformed)
        );
        assert_eq!(
            text[1..].parse::<AccountId>(),
            Err(DeviceListError::Malformed)
        );
        assert_eq!(
            alloc::format!("{text}0").parse::<AccountId>(),
            Err(DeviceListError::Malformed)
        );
    }

    #[test]
    fn account_safety_number() {
        use crate::protocol::fingerprint::{Fingerprint, SafetyNumber};
        use sha2::Sha512;
        // Written out from SPEC.md 25.8, not through the crate's code.
        fn digits(account: &[u8; 32]) -> alloc::string::String {
            let mut h: [u8; 64] = Sha512::new()
                .chain_update(b"cubbyhole/v1 account fingerprint")
                .chain_update(account)
                .finalize()
                .into();
            for _ in 0..5200 {
                h = Sha512::new()
                    .chain_update(h)
                    .chain_update(account)
                    .finalize()
                    .into();
            }
            h[..30]
                .chunks(5)
                .map(|c| {
                    let v = c.iter().fold(0u64, |a, b| a * 256 + u64::from(*b));
                    alloc::format!("{:05}", v % 100_000)
                })
                .collect()
        }
        let a = AccountId::of_founder(key(1).public());
        let b = AccountId::of_founder(key(2).public());
        let (da, db) = (digits(&a.0), digits(&b.0));
        assert_eq!(Fingerprint::of_account(&a).as_str(), da);
        let expected = if da <= db { da + &db } else { db + &da };
        assert_eq!(SafetyNumber::for_accounts(&a, &b).as_str(), expected);
        assert_eq!(SafetyNumber::for_accounts(&b, &a).as_str(), expected);
        // Not the identity key's fingerprint of the same 32 bytes.
        assert_ne!(
            Fingerprint::of_account(&AccountId(*key(1).public().as_bytes())),
            Fingerprint::of(key(1).public())
        );
    }
}
