//! The bodies of cubbyhole's fuzz targets, as plain functions.
//!
//! This file depends on nothing but `cubbyhole`, `cubbyhole-http` (for the
//! fetch query, [`decode_fetch_query`]), `rand_core` (the crate's own RNG
//! traits) and `std`, so that it compiles both inside the cargo-fuzz crate
//! (`fuzz/`, with libFuzzer and sanitizers) and inside the root crate's
//! integration tests (`tests/fuzz_corpus.rs` and `tests/properties.rs`
//! include it with `#[path]`), where every checked-in corpus file is replayed
//! on the stable compiler.
//!
//! Every target panics (an `assert!`) when an invariant of the protocol
//! profile is broken; any other outcome of arbitrary input is fine.
//!
//! Fixtures (identities, prekey stores, live sessions) are deterministic:
//! fixed identity seeds and [`TestRng`], a counter-based generator. The seed
//! corpora in `fuzz/corpus/` are built from the same fixtures
//! ([`seed_corpus`]), so that their messages authenticate against the
//! fixtures the targets use.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use cubbyhole::bundle::{BUNDLE_LEN_WITHOUT_OPK, BUNDLE_LEN_WITH_OPK};
use cubbyhole::client::accounts::{AccountHeader, ACCOUNT_HEADER_LEN};
use cubbyhole::client::frame::{BadFrame, Frame};
use cubbyhole::client::pairing::{
    PairingContact, PairingMessage, PairingOffer, PairingRefusal, PayloadError,
    MAX_PAIRING_CONTACTS, PAIRING_PAYLOAD_LEN,
};
use cubbyhole::devices::MAX_DEVICES;
use cubbyhole::relay::{MailboxUsage, MemoryRelayStorage, Relay, RelayConfig, RelayStorage};
use cubbyhole::storage::{
    LocalIdentity, MessageId, PrekeyState, SessionEntry, SessionRecord, Trust, LOCAL_IDENTITY_LEN,
};
use cubbyhole::transport::{
    self, encode_acknowledge, encode_envelope, encode_envelope_list, stamp::Stamp, AccessVerifier,
    BundleSetUpload, DepositPass, DeviceAddress, Envelope, EnvelopeId, MailboxAuth, MailboxOp,
    SignedPrekeyRecord, TransportError, MAILBOX_AUTH_LEN,
};
use cubbyhole::{
    AccountId, DeviceEntry, DeviceList, DeviceListChain, DeviceListError, UnsignedDeviceList,
    VerifiedDeviceList,
};
use cubbyhole::{
    Error, FreshnessPolicy, Header, IdentityKey, IdentityKeyPair, Incoming, PrekeyBundle,
    PrekeyLookup, PrekeyStore, Role, Session, SessionConfig, VerifiedBundle,
};
use cubbyhole_http::wire::FetchQuery;
use rand_core::{CryptoRng, RngCore};

/// The fixed "current time" of every target (unix seconds).
pub const NOW: u64 = 1_700_000_000;

/// Identity seed of the initiator (Alice) in every fixture.
pub const ALICE_SEED: [u8; 32] = [0xA1; 32];
/// Identity seed of the responder (Bob) in every fixture.
pub const BOB_SEED: [u8; 32] = [0xB2; 32];

/// Tag length of the wire format.
const TAG_LEN: usize = 16;

/// A deterministic generator (SplitMix64) for fixtures and fuzzing only.
///
/// It is **not** cryptographically secure: it implements [`CryptoRng`] only
/// so that the crate's API accepts it, and makes every fixture reproducible.
#[derive(Clone, Debug)]
pub struct TestRng(u64);

impl TestRng {
    /// A generator whose whole output is determined by `seed`.
    pub fn new(seed: u64) -> Self {
        TestRng(seed)
    }
}

impl RngCore for TestRng {
    fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl CryptoRng for TestRng {}

/// Re-encodes everything before the ciphertext from a decoded message's
/// accessors (version, kind, prekey fields, header).
pub fn encode_prefix(message: &Incoming<'_>) -> Vec<u8> {
    let mut out = vec![0x01];
    match message.prekey() {
        Some(f) => {
            out.push(0x01);
            out.extend_from_slice(&f.identity);
            out.extend_from_slice(&f.ephemeral);
            out.extend_from_slice(&f.signed_prekey_id.to_be_bytes());
            match f.one_time_prekey_id {
                Some(id) => {
                    out.push(1);
                    out.extend_from_slice(&id.to_be_bytes());
                }
                None => out.push(0),
            }
        }
        None => out.push(0x02),
    }
    let h = message.header();
    out.extend_from_slice(&h.ratchet_key);
    out.extend_from_slice(&h.pn.to_be_bytes());
    out.extend_from_slice(&h.n.to_be_bytes());
    out
}

fn same(a: &[u8], b: &[u8]) -> bool {
    a == b
}

// ---------------------------------------------------------------------------
// Allocation meter
// ---------------------------------------------------------------------------

/// What a [`measure`]d call allocated on its thread.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocStats {
    /// The largest single allocation (or reallocation's new size), bytes.
    pub largest: usize,
    /// Every allocation's size added up, bytes.
    pub total: usize,
}

thread_local! {
    static METER: Cell<Option<AllocStats>> = const { Cell::new(None) };
}

/// Set by the first allocation through [`MeteredAllocator`]: whether it is
/// this binary's global allocator.
static METERED: AtomicBool = AtomicBool::new(false);

fn meter(size: usize) {
    if !METERED.load(Ordering::Relaxed) {
        METERED.store(true, Ordering::Relaxed);
    }
    let _ = METER.try_with(|m| {
        if let Some(s) = m.get() {
            m.set(Some(AllocStats {
                largest: s.largest.max(size),
                total: s.total.saturating_add(size),
            }));
        }
    });
}

/// The system allocator, metering the calling thread's allocations while
/// [`measure`] runs. The binaries that include this file install it with
/// `#[global_allocator]` (the fuzz crate and `tests/fuzz_corpus.rs`);
/// elsewhere [`measure`] reports nothing and the allocation bounds are not
/// checked.
#[derive(Debug)]
pub struct MeteredAllocator;

// SAFETY: every call is forwarded unchanged to the system allocator; the
// wrapper only records sizes in a const-initialized thread-local `Cell`
// (no destructor, no lazy initialization: it never allocates) and a
// relaxed atomic flag.
unsafe impl GlobalAlloc for MeteredAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        meter(layout.size());
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        meter(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        meter(new_size);
        System.realloc(ptr, layout, new_size)
    }
}

/// Runs `f` and reports what it allocated on this thread, or `None` if
/// [`MeteredAllocator`] is not the global allocator.
pub fn measure<R>(f: impl FnOnce() -> R) -> (R, Option<AllocStats>) {
    let outer = METER.with(|m| m.replace(Some(AllocStats::default())));
    let out = f();
    let stats = METER.with(|m| m.replace(outer));
    (out, stats.filter(|_| METERED.load(Ordering::Relaxed)))
}

/// Largest single allocation a decoder may make for `len` input bytes.
pub fn max_allocation(len: usize) -> usize {
    8 * len + 1024
}

/// Most bytes a decoder may allocate in all for `len` input bytes.
pub fn max_total_allocation(len: usize) -> usize {
    16 * len + 4096
}

/// Bounded allocation: decoding `len` bytes allocates at most a constant
/// factor of `len` plus a fixed slack, so no count or length field reserves
/// memory before the bytes it counts are there.
/// Runs `decoder` on `len` input bytes under the allocation meter and
/// checks that its allocations stay within the bounds for that input.
fn decode_bounded<R>(decoder: &str, len: usize, decode: impl FnOnce() -> R) -> R {
    let (result, stats) = measure(decode);
    check_allocation(decoder, len, stats);
    result
}

fn check_allocation(decoder: &str, len: usize, stats: Option<AllocStats>) {
    let Some(stats) = stats else { return };
    assert!(
        stats.largest <= max_allocation(len),
        "{decoder}: allocated {} bytes at once for {len} input bytes",
        stats.largest
    );
    assert!(
        stats.total <= max_total_allocation(len),
        "{decoder}: allocated {} bytes in all for {len} input bytes",
        stats.total
    );
}

/// How far a target got with an input: past its decoder (the input
/// reached the code behind it), or refused by the decoder, with the error.
/// The seed corpus replay (`tests/fuzz_corpus.rs`) checks that every seed
/// reaches past the decoder, or is a listed, intended decode error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reach {
    /// The decoder accepted the input: the checks behind it ran.
    Decoded,
    /// The decoder refused it; the error, as `Debug` prints it.
    Rejected(String),
}

fn rejected(error: impl std::fmt::Debug) -> Reach {
    Reach::Rejected(format!("{error:?}"))
}

// ---------------------------------------------------------------------------
// decode_incoming
// ---------------------------------------------------------------------------

/// `Incoming::decode` on arbitrary bytes: only `Decode` or (prekey messages)
/// `InvalidKey` errors; on success the accessors re-encode to exactly the
/// input's prefix, and a tag fits after it.
pub fn decode_incoming(data: &[u8]) -> Reach {
    // Decoding checks the structure only (IK_A is validated by accept).
    let message = match decode_bounded("Incoming::decode", data.len(), || Incoming::decode(data)) {
        Ok(m) => m,
        Err(e @ Error::Decode(_)) => return rejected(e),
        Err(e) => panic!("Incoming::decode returned {e:?}"),
    };
    let prefix = encode_prefix(&message);
    assert!(
        data.len() >= prefix.len() + TAG_LEN,
        "decoded a message too short for its header and tag"
    );
    assert_eq!(
        &data[..prefix.len()],
        &prefix[..],
        "prefix does not re-encode"
    );
    // Decoding is a function of the bytes.
    let again = Incoming::decode(data).expect("decodes twice");
    assert_eq!(again.header(), message.header());
    assert_eq!(again.prekey(), message.prekey());
    Reach::Decoded
}

// ---------------------------------------------------------------------------
// decode_bundle
// ---------------------------------------------------------------------------

/// `PrekeyBundle::decode`: the encoding is canonical (re-encodes to the
/// input), `verify` at a fixed time gives exactly the profile's outcome, and
/// a session can be initiated (or refused with `InvalidKey`) from any bundle
/// that verifies.
pub fn decode_bundle(data: &[u8]) -> Reach {
    let bundle = match decode_bounded("PrekeyBundle::decode", data.len(), || {
        PrekeyBundle::decode(data)
    }) {
        Ok(b) => b,
        Err(e @ (Error::Decode(_) | Error::InvalidKey)) => return rejected(e),
        Err(e) => panic!("PrekeyBundle::decode returned {e:?}"),
    };
    assert_eq!(bundle.encode(), data, "bundle encoding is not canonical");
    let expected_len = if bundle.one_time_prekey().is_some() {
        BUNDLE_LEN_WITH_OPK
    } else {
        BUNDLE_LEN_WITHOUT_OPK
    };
    assert_eq!(data.len(), expected_len);
    assert_eq!(PrekeyBundle::decode(&bundle.encode()).as_ref(), Ok(&bundle));

    let policy = FreshnessPolicy::default();
    let stale = NOW.saturating_sub(bundle.signed_prekey_created()) > policy.max_age;
    match bundle.clone().verify(NOW, policy) {
        Ok(verified) => {
            assert!(!stale, "a stale bundle verified");
            assert_eq!(*verified, bundle);
            let identity = alice();
            let mut rng = TestRng::new(7);
            match Session::initiate(&mut rng, identity, &verified, SessionConfig::default()) {
                Ok(mut session) => {
                    assert!(session.sends_prekey_messages());
                    let m = session.encrypt(&mut rng, b"x").expect("first message");
                    let m = Incoming::decode(&m).expect("own message decodes");
                    let f = m.prekey().expect("a prekey message");
                    assert_eq!(f.signed_prekey_id, bundle.signed_prekey_id());
                    assert_eq!(
                        f.one_time_prekey_id,
                        bundle.one_time_prekey().map(|(id, _)| id)
                    );
                }
                Err(Error::InvalidKey) => {}
                Err(e) => panic!("Session::initiate returned {e:?}"),
            }
        }
        Err(Error::Signature) => {}
        Err(Error::StaleBundle) => assert!(stale, "fresh bundle reported stale"),
        Err(e) => panic!("verify returned {e:?}"),
    }
    Reach::Decoded
}

// ---------------------------------------------------------------------------
// decode_state
// ---------------------------------------------------------------------------

/// A fixed normal message with `pn = n = 0` (bounded work whatever the
/// state's limits) used to exercise `decrypt` on decoded states.
fn fixed_probe_message() -> Vec<u8> {
    let mut m = vec![0x01, 0x02];
    // The X25519 base point: a valid, contributory public key.
    let mut key = [0u8; 32];
    key[0] = 9;
    m.extend_from_slice(&key);
    m.extend_from_slice(&[0; 8]);
    m.extend_from_slice(b"probe");
    m.extend_from_slice(&[0; TAG_LEN]);
    m
}

/// `Session::from_bytes`: canonical encoding (to_bytes gives the input
/// back), `encrypt` does not panic and either changes nothing or leaves a
/// restorable state, `decrypt` of a probe fails without changing anything.
pub fn decode_state(data: &[u8]) -> Reach {
    // The identities are not part of the state: any valid keys do.
    let (alice, bob) = (alice().public(), directory().bob.public());
    let mut session = match decode_bounded("Session::from_bytes", data.len(), || {
        Session::from_bytes(data, alice, bob)
    }) {
        Ok(s) => s,
        Err(e @ Error::State(_)) => return rejected(e),
        Err(e) => panic!("Session::from_bytes returned {e:?}"),
    };
    let before = session.to_bytes();
    assert!(same(&before, data), "state encoding is not canonical");
    assert!(session.skipped_message_keys() <= session.config().max_skipped_keys as usize);
    if session.sends_prekey_messages() {
        assert_eq!(session.role(), Role::Initiator);
    }
    let _ = (session.local_identity(), session.remote_identity());

    let mut probe = session.clone();
    let probe_message = fixed_probe_message();
    assert!(
        probe.decrypt(&probe_message).is_err(),
        "forged probe decrypted"
    );
    assert!(
        same(&probe.to_bytes(), data),
        "rejected message changed the state"
    );

    let prekey = session.sends_prekey_messages();
    let mut rng = TestRng::new(3);
    match session.encrypt(&mut rng, b"fuzz") {
        Ok(message) => {
            let m = Incoming::decode(&message).expect("own message decodes");
            assert_eq!(m.prekey().is_some(), prekey);
            if let Some(f) = m.prekey() {
                assert_eq!(&f.identity, session.local_identity().as_bytes());
            }
            let after = session.to_bytes();
            let restored = restore_as(&after, &session).expect("state after encrypt restores");
            assert!(same(&restored.to_bytes(), &after));
        }
        Err(_) => assert!(
            same(&session.to_bytes(), data),
            "failed encrypt changed the state"
        ),
    }
    Reach::Decoded
}

/// `Session::from_bytes` with the identities of `like` (the state does not
/// hold them).
pub fn restore_as(bytes: &[u8], like: &Session) -> Result<Session, Error> {
    Session::from_bytes(bytes, like.local_identity(), like.remote_identity())
}

// ---------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------

fn alice() -> &'static IdentityKeyPair {
    static A: OnceLock<IdentityKeyPair> = OnceLock::new();
    A.get_or_init(|| IdentityKeyPair::from_seed(&ALICE_SEED))
}

/// Bob's identity, prekey store and published bundles.
pub struct Directory {
    /// Bob's identity key pair.
    pub bob: IdentityKeyPair,
    /// Bob's prekeys: signed prekey 2 (current), 1 (retained), one-time
    /// prekeys 1 to 3.
    pub store: PrekeyStore,
    /// A bundle with signed prekey 2 and one-time prekey 1.
    pub with_opk: VerifiedBundle,
    /// A bundle with signed prekey 2 and no one-time prekey.
    pub without_opk: VerifiedBundle,
    /// A bundle with the retained signed prekey 1 and one-time prekey 3.
    pub retained: VerifiedBundle,
}

/// The shared, deterministic responder fixture.
pub fn directory() -> &'static Directory {
    static D: OnceLock<Directory> = OnceLock::new();
    D.get_or_init(|| {
        let mut rng = TestRng::new(0xB0B);
        let bob = IdentityKeyPair::from_seed(&BOB_SEED);
        let mut store =
            PrekeyStore::new(&mut rng, &bob, NOW - 86_400).expect("time in unix seconds");
        let old = store.current_signed_prekey().clone();
        store
            .rotate_signed_prekey(&mut rng, &bob, NOW - 3_600)
            .expect("time in unix seconds");
        store.generate_one_time_prekeys(&mut rng, 3);
        let verify = |b: PrekeyBundle| {
            b.verify(NOW, FreshnessPolicy::default())
                .expect("fixture bundle")
        };
        let with_opk = verify(store.bundle(&bob));
        let without_opk = verify(PrekeyBundle::new(&bob, store.current_signed_prekey(), None));
        let retained = verify(PrekeyBundle::new(&bob, &old, store.one_time_prekey(3)));
        Directory {
            bob,
            store,
            with_opk,
            without_opk,
            retained,
        }
    })
}

/// A live session pair after some traffic, and every message sent.
pub struct SessionFixture {
    /// Alice (initiator): has received Bob's chain, sends normal messages.
    pub alice: Session,
    /// Bob (responder): has a receiving and sending chain and skipped keys
    /// of two of Alice's chains.
    pub bob: Session,
    /// Every message of the script, in sending order, with its receiver
    /// (`true`: Bob).
    pub sent: Vec<(bool, Vec<u8>)>,
    /// Messages encrypted after the script and not delivered: Alice to Bob
    /// (next in the current chain), and Bob to Alice.
    pub undelivered: Vec<(bool, Vec<u8>)>,
}

/// The shared, deterministic live session pair of `decrypt_session`.
pub fn session_fixture() -> &'static SessionFixture {
    static F: OnceLock<SessionFixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = directory();
        let mut rng = TestRng::new(0xA11CE);
        let config = SessionConfig::default();
        let mut a = Session::initiate(&mut rng, alice(), &dir.with_opk, config).expect("initiate");
        let mut store = dir.store.clone();
        let mut sent = Vec::new();
        let mut send = |s: &mut Session, to_bob: bool, rng: &mut TestRng, pt: &[u8]| {
            let m = s.encrypt(rng, pt).expect("encrypt");
            sent.push((to_bob, m.clone()));
            m
        };
        send(&mut a, true, &mut rng, b"a0");
        let a1 = send(&mut a, true, &mut rng, b"a1");
        send(&mut a, true, &mut rng, b"a2");
        let accepted = store
            .accept(&dir.bob, &Incoming::decode(&a1).expect("decode"), config)
            .expect("accept");
        let mut b = accepted.session;
        send(&mut b, false, &mut rng, b"b0");
        let b1 = send(&mut b, false, &mut rng, b"b1");
        assert_eq!(a.decrypt(&b1).expect("b1"), b"b1");
        send(&mut a, true, &mut rng, b"a3");
        let a4 = send(&mut a, true, &mut rng, b"a4");
        assert_eq!(b.decrypt(&a4).expect("a4"), b"a4");
        let undelivered = vec![
            (true, a.encrypt(&mut rng, b"a5").expect("a5")),
            (true, a.encrypt(&mut rng, b"a6").expect("a6")),
            (false, b.encrypt(&mut rng, b"b2").expect("b2")),
        ];
        SessionFixture {
            alice: a,
            bob: b,
            sent,
            undelivered,
        }
    })
}

// ---------------------------------------------------------------------------
// decrypt_session
// ---------------------------------------------------------------------------

/// Arbitrary bytes to `Session::decrypt` of both sides of a live pair: a
/// rejection leaves the state byte-identical; an accepted message leaves a
/// restorable state and is rejected the second time, without changes.
pub fn decrypt_session(data: &[u8]) -> Reach {
    // The decoder is the wire format's: the sessions decode before they
    // decrypt.
    let reach = match Incoming::decode(data) {
        Ok(_) => Reach::Decoded,
        Err(e) => rejected(e),
    };
    let fx = session_fixture();
    for receiver in [&fx.bob, &fx.alice] {
        let mut session = receiver.clone();
        let before = session.to_bytes();
        match session.decrypt(data) {
            Err(Error::State(_)) => panic!("decrypt returned a state error"),
            Err(_) => assert!(
                same(&session.to_bytes(), &before),
                "rejected message changed the state"
            ),
            Ok(_) => {
                let after = session.to_bytes();
                assert!(
                    !same(&after, &before),
                    "accepted message did not change the state"
                );
                let restored = restore_as(&after, &session).expect("state after decrypt restores");
                assert!(same(&restored.to_bytes(), &after));
                assert!(session.decrypt(data).is_err(), "message decrypted twice");
                assert!(
                    same(&session.to_bytes(), &after),
                    "rejected replay changed the state"
                );
            }
        }
    }
    reach
}

// ---------------------------------------------------------------------------
// accept_prekey
// ---------------------------------------------------------------------------

/// Arbitrary bytes to the responder's accept path with a fixed store: the
/// profile's order of checks on prekey ids, no consumption on failure,
/// exactly the named one-time prekey consumed on success.
pub fn accept_prekey(data: &[u8]) -> Reach {
    let dir = directory();
    let incoming = match Incoming::decode(data) {
        Ok(m) => m,
        Err(e) => return rejected(e),
    };
    let mut store = dir.store.clone();
    let count = store.one_time_prekey_count();
    let held = incoming.prekey().map(|f| {
        (
            store.signed_prekey(f.signed_prekey_id).is_some(),
            f.one_time_prekey_id
                .is_none_or(|id| store.one_time_prekey(id).is_some()),
        )
    });
    let result = store.accept(&dir.bob, &incoming, SessionConfig::default());
    let (Some(fields), Some((spk_held, opk_held))) = (incoming.prekey(), held) else {
        assert!(
            matches!(result, Err(Error::Decode(_))),
            "accepted a normal message"
        );
        assert_eq!(store.one_time_prekey_count(), count);
        return Reach::Decoded;
    };
    let fields = *fields;
    let identity_valid = IdentityKey::from_bytes(&fields.identity).is_ok();
    match result {
        Err(e) => {
            assert_eq!(
                store.one_time_prekey_count(),
                count,
                "failed accept consumed a prekey"
            );
            // The profile's order of checks for a new session.
            if !identity_valid {
                assert_eq!(e, Error::InvalidKey, "order of checks: IK_A first");
            } else if !spk_held || !opk_held {
                assert_eq!(e, Error::UnknownPrekey, "order of checks: prekey ids");
            }
        }
        Ok(accepted) => {
            assert!(identity_valid && spk_held && opk_held);
            assert_eq!(accepted.consumed_one_time_prekey, fields.one_time_prekey_id);
            let consumed = usize::from(fields.one_time_prekey_id.is_some());
            assert_eq!(store.one_time_prekey_count(), count - consumed);
            if let Some(id) = fields.one_time_prekey_id {
                assert!(
                    store.one_time_prekey(id).is_none(),
                    "one-time prekey not deleted"
                );
            }
            let mut session = accepted.session;
            assert_eq!(session.role(), Role::Responder);
            assert_eq!(session.remote_identity().as_bytes(), &fields.identity);
            assert!(session.matches(&incoming));
            let after = session.to_bytes();
            let restored = restore_as(&after, &session).expect("accepted session restores");
            assert!(same(&restored.to_bytes(), &after));
            // A repeat goes to the session it created: a duplicate.
            assert_eq!(session.decrypt(data), Err(Error::Duplicate));
            assert!(same(&session.to_bytes(), &after));
            if fields.one_time_prekey_id.is_some() {
                let count = store.one_time_prekey_count();
                let again = store.accept(&dir.bob, &incoming, SessionConfig::default());
                assert_eq!(
                    again.err(),
                    Some(Error::UnknownPrekey),
                    "one-time prekey reused"
                );
                assert_eq!(store.one_time_prekey_count(), count);
            }
        }
    }
    Reach::Decoded
}

// ---------------------------------------------------------------------------
// Stored records: decode_prekeys, decode_prekey_state, decode_identity
// ---------------------------------------------------------------------------

/// The prekey message of the fixture: Alice to Bob's signed prekey 2 and
/// one-time prekey 1, plaintext `hello Bob`.
fn fixture_prekey_message() -> &'static [u8] {
    static M: OnceLock<Vec<u8>> = OnceLock::new();
    M.get_or_init(|| {
        prekey_messages()
            .into_iter()
            .find(|(name, _)| *name == "prekey-opk")
            .map(|(_, m)| m)
            .expect("fixture prekey message")
    })
}

/// `PrekeyStore::from_bytes` (the private prekeys every store persists):
/// canonical (whatever decodes re-encodes to the input), bounded
/// allocation, and the decoded store survives its whole lifecycle (see
/// [`exercise_prekey_store`]).
pub fn decode_prekeys(data: &[u8]) -> Reach {
    let result = decode_bounded("PrekeyStore::from_bytes", data.len(), || {
        PrekeyStore::from_bytes(data)
    });
    let store = match result {
        Ok(s) => s,
        Err(e @ Error::State(_)) => return rejected(e),
        Err(e) => panic!("PrekeyStore::from_bytes returned {e:?}"),
    };
    assert!(
        same(&store.to_bytes(), data),
        "prekey store encoding is not canonical"
    );
    exercise_prekey_store(store);
    Reach::Decoded
}

/// What any decoded prekey store supports: answering the fixture's prekey
/// message (a failure consumes nothing), and the lifecycle operations with
/// their documented effect (generation hands out exactly the next ids,
/// rotation retains the old signed prekey, withdrawal and forgetting drop
/// what they say), after which the store still re-encodes canonically.
pub fn exercise_prekey_store(mut store: PrekeyStore) {
    let dir = directory();
    let ids: Vec<u32> = store.one_time_prekeys().map(|k| k.id()).collect();
    assert_eq!(store.one_time_prekey_count(), ids.len());
    let bundle = store.bundle(&dir.bob);
    assert_eq!(
        bundle.signed_prekey_id(),
        store.current_signed_prekey().id()
    );
    assert_eq!(
        bundle.one_time_prekey().map(|(id, _)| id),
        ids.first().copied()
    );

    let incoming = Incoming::decode(fixture_prekey_message()).expect("fixture message");
    let before = store.to_bytes();
    match store.accept(&dir.bob, &incoming, SessionConfig::default()) {
        Ok(accepted) => {
            assert_eq!(accepted.plaintext, b"hello Bob");
            assert_eq!(accepted.consumed_one_time_prekey, Some(1));
            assert_eq!(store.one_time_prekey_count(), ids.len() - 1);
            assert!(store.one_time_prekey(1).is_none(), "one-time prekey kept");
        }
        Err(_) => assert!(
            same(&store.to_bytes(), &before),
            "failed accept changed the store"
        ),
    }

    let mut rng = TestRng::new(0x9E7);
    let next = store.next_one_time_prekey_id();
    let new: Vec<u32> = store
        .generate_one_time_prekeys(&mut rng, 2)
        .iter()
        .map(|k| k.id())
        .collect();
    assert_eq!(
        new,
        [next, next.wrapping_add(1)],
        "generate_one_time_prekeys did not return the keys it generated"
    );
    assert_eq!(store.next_one_time_prekey_id(), next.wrapping_add(2));
    for id in &new {
        assert!(store.one_time_prekey(*id).is_some());
    }

    let current = store.current_signed_prekey().id();
    let retained = store.signed_prekeys().count();
    store
        .rotate_signed_prekey(&mut rng, &dir.bob, NOW)
        .expect("time in unix seconds");
    assert_eq!(store.current_signed_prekey().id(), current.wrapping_add(1));
    assert_eq!(store.current_signed_prekey().created(), NOW);
    assert_eq!(store.signed_prekeys().count(), retained + 1);
    assert!(
        store.signed_prekey(current).is_some(),
        "old signed prekey dropped"
    );

    store
        .forget_retired_before(NOW)
        .expect("time in unix seconds");
    assert!(store.signed_prekeys().skip(1).all(|k| k.created() >= NOW));
    let bound = next.wrapping_add(1);
    let count = store.one_time_prekey_count();
    let removed = store.remove_one_time_prekeys_below(bound);
    assert_eq!(store.one_time_prekey_count(), count - removed);
    assert!(store.one_time_prekeys().all(|k| k.id() >= bound));

    let bytes = store.to_bytes();
    let again = PrekeyStore::from_bytes(&bytes).expect("a store restores after its lifecycle");
    assert!(same(&again.to_bytes(), &bytes));
}

/// `PrekeyState::from_bytes` (the client's persisted prekeys and their
/// bookkeeping): canonical, bounded allocation, the prekey store is the
/// tail of the encoding.
pub fn decode_prekey_state(data: &[u8]) -> Reach {
    let result = decode_bounded("PrekeyState::from_bytes", data.len(), || {
        PrekeyState::from_bytes(data)
    });
    let state = match result {
        Ok(s) => s,
        Err(e @ Error::State(_)) => return rejected(e),
        Err(e) => panic!("PrekeyState::from_bytes returned {e:?}"),
    };
    let prekeys = state.prekeys.to_bytes();
    let lists = state.retired_at.len() + state.one_time_retired.len();
    if data[0] == 3 {
        assert!(
            same(&state.to_bytes(), data),
            "prekey state encoding is not canonical"
        );
        assert_eq!(
            data.len(),
            30 + 12 * lists + 20 * state.accepted.len() + prekeys.len()
        );
    } else {
        // Version 2 (no replay digests) decodes and is written as version 3.
        assert!(state.accepted.is_empty());
        assert_eq!(data.len(), 26 + 12 * lists + prekeys.len());
    }
    assert!(data.ends_with(&prekeys));
    let restored = PrekeyState::from_bytes(&state.to_bytes()).expect("restores");
    assert_eq!(restored.accepted, state.accepted);
    assert_eq!(restored.upload_counter, state.upload_counter);
    assert_eq!(restored.last_rotation, state.last_rotation);
    assert_eq!(restored.upload_pending, state.upload_pending);
    assert_eq!(restored.retired_at, state.retired_at);
    assert_eq!(restored.one_time_retired, state.one_time_retired);
    Reach::Decoded
}

/// `LocalIdentity::from_bytes` (the device's identity row): exactly 36
/// bytes decode, canonically; the key pair is the seed's, its public key is
/// a valid identity key, and what it signs verifies.
pub fn decode_identity(data: &[u8]) -> Reach {
    let result = decode_bounded("LocalIdentity::from_bytes", data.len(), || {
        LocalIdentity::from_bytes(data)
    });
    let identity = match result {
        Ok(i) => i,
        Err(e @ Error::State(_)) => {
            assert_ne!(data.len(), LOCAL_IDENTITY_LEN, "a 36-byte identity refused");
            return rejected(e);
        }
        Err(e) => panic!("LocalIdentity::from_bytes returned {e:?}"),
    };
    assert_eq!(data.len(), LOCAL_IDENTITY_LEN);
    assert!(
        same(&identity.to_bytes(), data),
        "identity does not re-encode"
    );
    assert_eq!(&identity.keys.seed()[..], &data[..32]);
    let public = *identity.keys.public();
    assert_eq!(IdentityKey::from_bytes(public.as_bytes()), Ok(public));
    let spk =
        cubbyhole::SignedPrekey::from_secret(&identity.keys, identity.device_id, NOW, [0x5A; 32])
            .expect("time in unix seconds");
    PrekeyBundle::new(&identity.keys, &spk, None)
        .verify(NOW, FreshnessPolicy::default())
        .expect("a bundle of the decoded identity verifies");
    Reach::Decoded
}

// ---------------------------------------------------------------------------
// Client layer: decode_frame, decode_record
// ---------------------------------------------------------------------------

/// `Frame::decode` (the client frame, the plaintext of every message a
/// peer sends): only `BadFrame`; a v2 frame re-encodes to exactly its
/// input, a v1 frame is a message without id whose body is the rest.
pub fn decode_frame(data: &[u8]) -> Reach {
    let owned = data.to_vec();
    let frame = match decode_bounded("Frame::decode", data.len(), || Frame::decode(owned)) {
        Ok(frame) => frame,
        Err(e @ BadFrame) => return rejected(e),
    };
    match data[0] {
        0x02 => assert!(
            same(&frame.encode(), data),
            "frame encoding is not canonical"
        ),
        0x01 => {
            assert_eq!(frame.message, Some((None, data[5..].to_vec())));
            assert!(frame.generation.is_none() && frame.receipts.is_empty());
        }
        v => panic!("frame version {v} decoded"),
    }
    assert_eq!(frame.device_id.to_be_bytes(), data[1..5]);
    Reach::Decoded
}

/// `SessionRecord::from_bytes` (a peer's stored sessions): only `State`
/// errors; a record re-encodes to exactly its input; a bare session state
/// (the form before records) is a record of one entry of generation 0, and
/// its record encoding decodes again to the same.
pub fn decode_record(data: &[u8]) -> Reach {
    let (alice, bob) = (alice().public(), directory().bob.public());
    let record = match decode_bounded("SessionRecord::from_bytes", data.len(), || {
        SessionRecord::from_bytes(data, alice, bob)
    }) {
        Ok(r) => r,
        Err(e @ Error::State(_)) => return rejected(e),
        Err(e) => panic!("SessionRecord::from_bytes returned {e:?}"),
    };
    let bytes = record.to_bytes();
    if data[0] == cubbyhole::protocol::state::STATE_VERSION {
        assert_eq!(record.entries().len(), 1);
        assert_eq!(record.entries()[0].generation, 0);
        let again = SessionRecord::from_bytes(&bytes, alice, bob).expect("re-encoded record");
        assert!(same(&again.to_bytes(), &bytes));
    } else {
        assert!(same(&bytes, data), "record encoding is not canonical");
    }
    let ids: BTreeSet<[u8; 16]> = record.entries().iter().map(|e| e.id).collect();
    assert_eq!(ids.len(), record.entries().len(), "two entries with one id");
    Reach::Decoded
}

// ---------------------------------------------------------------------------
// Relay formats: decode_upload, decode_mailbox_auth, decode_envelope,
// decode_envelope_list, decode_acknowledge, decode_fetch_query
// ---------------------------------------------------------------------------

/// Bob's device number on the fixture relay.
pub const BOB_DEVICE_ID: u32 = 1;

/// Length of an upload without one-time prekeys.
pub const UPLOAD_FIXED_LEN: usize = 1 + 32 + 4 + 8 + 4 + 8 + 32 + 64 + 1 + 2 + 64;

/// A relay where Bob's device has published (counter 1: his current signed
/// prekey and one-time prekeys 1 to 3), with three envelopes pending in
/// his mailbox and two outstanding challenges.
pub struct RelayFixture {
    /// Bob's device.
    pub device: DeviceAddress,
    /// The signed upload Bob published.
    pub upload: Vec<u8>,
    /// The relay's storage after the publication, deposits and challenges.
    pub storage: MemoryRelayStorage,
    /// The envelopes pending in Bob's mailbox, oldest first.
    pub envelopes: Vec<Envelope>,
    /// The outstanding challenges for Bob's mailbox.
    pub challenges: [[u8; 32]; 2],
    /// A fetch proof over the first challenge.
    pub fetch_auth: MailboxAuth,
}

impl RelayFixture {
    /// A relay (default bounds) over a copy of the fixture's storage.
    pub fn relay(&self) -> Relay<MemoryRelayStorage> {
        Relay::new(self.storage.clone(), RelayConfig::unpriced())
    }
}

/// The shared, deterministic relay fixture.
pub fn relay_fixture() -> &'static RelayFixture {
    static F: OnceLock<RelayFixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = directory();
        let device = DeviceAddress::new(dir.bob.public(), BOB_DEVICE_ID);
        let one_time: Vec<_> = dir.store.one_time_prekeys().collect();
        let upload = BundleSetUpload::new(
            BOB_DEVICE_ID,
            &dir.bob,
            1,
            dir.store.current_signed_prekey(),
            &one_time,
            true,
        )
        .sign(&dir.bob);
        let mut relay = Relay::new(MemoryRelayStorage::new(), RelayConfig::unpriced());
        relay.publish(NOW, &upload).expect("publish");
        let envelopes: Vec<Envelope> = (1..=3u8)
            .map(|i| Envelope {
                id: EnvelopeId([i; 16]),
                payload: vec![i; 10 * usize::from(i)],
            })
            .collect();
        for e in &envelopes {
            relay
                .deposit(NOW, &device.mailbox(), e, &DepositPass::NONE)
                .expect("deposit");
        }
        let mut rng = TestRng::new(0xC4A1);
        let mut challenge = || {
            relay
                .challenge(NOW, &mut rng, &device.mailbox())
                .expect("challenge")
        };
        let challenges = [challenge(), challenge()];
        let fetch_auth =
            MailboxAuth::sign(&dir.bob, BOB_DEVICE_ID, MailboxOp::Fetch, challenges[0]);
        RelayFixture {
            device,
            upload,
            storage: relay.into_storage(),
            envelopes,
            challenges,
            fetch_auth,
        }
    })
}

fn usage(relay: &Relay<MemoryRelayStorage>, device: &DeviceAddress) -> MailboxUsage {
    relay
        .storage()
        .mailbox_usage(&device.mailbox())
        .expect("memory storage")
}

/// `BundleSetUpload::decode_verified` (the body of `POST /v1/directory`):
/// only `bad_request` or `unauthorized`, bounded allocation; a verified
/// upload has the length its count says, re-signs to the same bytes, and a
/// fresh relay publishes it exactly as its rules say (see
/// [`check_upload`]).
///
/// Inputs that start with 0x00 (not the upload version) also run the
/// structured half ([`signed_upload`]): fields read from the bytes, signed
/// by the fixture's identity, so the fuzzer reaches past the signatures.
pub fn decode_upload(data: &[u8]) -> Reach {
    let result = decode_bounded("BundleSetUpload::decode_verified", data.len(), || {
        BundleSetUpload::decode_verified(data)
    });
    let reach = match result {
        Err(e @ (TransportError::BadRequest(_) | TransportError::Unauthorized)) => rejected(e),
        Err(e) => panic!("decode_verified returned {e:?}"),
        Ok(upload) => {
            check_upload(data, &upload);
            Reach::Decoded
        }
    };
    if let Some((0, fields)) = data.split_first() {
        // The structured half has no decoder to fail: it reaches the relay.
        signed_upload(fields);
        return Reach::Decoded;
    }
    reach
}

/// A verified upload: its length, its re-encoding, and its publication to
/// a fresh relay (accepted unless its one-time prekey ids repeat, then
/// refused as a replay; the relay hands out a bundle that verifies, with
/// the upload's first one-time prekey).
fn check_upload(data: &[u8], upload: &BundleSetUpload) {
    let n = upload.one_time_prekeys.len();
    assert_eq!(data.len(), UPLOAD_FIXED_LEN + 36 * n);
    assert!(IdentityKey::from_bytes(&upload.device.identity).is_ok());
    let dir = directory();
    if upload.device.identity == *dir.bob.public().as_bytes() {
        assert!(
            same(&upload.sign(&dir.bob), data),
            "upload does not re-encode"
        );
    }
    let distinct = upload
        .one_time_prekeys
        .iter()
        .map(|(id, _)| *id)
        .collect::<BTreeSet<_>>()
        .len()
        == n;
    let mut relay = Relay::new(MemoryRelayStorage::new(), RelayConfig::unpriced());
    let max = relay.config().max_one_time_prekeys as usize;
    match relay.publish(NOW, data) {
        Ok(()) => {
            assert!(distinct && n <= max);
            assert_eq!(relay.one_time_prekeys_left(&upload.device), Ok(n as u32));
            let bundle = relay.fetch_bundle(NOW, &upload.device).expect("bundle");
            let bundle = PrekeyBundle::decode(&bundle).expect("the relay's bundle decodes");
            assert_eq!(bundle.identity().as_bytes(), &upload.device.identity);
            assert_eq!(bundle.signed_prekey_id(), upload.signed_prekey.id);
            assert_eq!(bundle.signed_prekey(), &upload.signed_prekey.public);
            assert_eq!(
                bundle.one_time_prekey().map(|(id, key)| (id, *key)),
                upload.one_time_prekeys.first().copied()
            );
            match bundle.verify(NOW, FreshnessPolicy::default()) {
                Ok(_) | Err(Error::StaleBundle) => {}
                Err(e) => panic!("the relay's bundle of a verified upload: {e:?}"),
            }
            assert_eq!(
                relay.publish(NOW, data),
                Err(TransportError::Replayed),
                "an upload was accepted twice"
            );
        }
        Err(TransportError::BadRequest(_)) => assert!(!distinct && n <= max),
        Err(TransportError::LimitExceeded(_)) => assert!(n > max),
        Err(e) => panic!("publish of a verified upload returned {e:?}"),
    }
}

/// Reads fixed-width big-endian fields from fuzzer bytes (zeros once they
/// run out).
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = self.0.len().min(N);
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.array())
    }
    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.array())
    }
}

/// The structured half of `decode_upload`: an upload of Bob's built from
/// fuzzer fields (counter 8, signed prekey id 4, created 8, flags 1, then
/// up to 16 one-time prekeys of id 4 and key byte 1), signed: it decodes
/// to itself, and published over the fixture relay (counter 1, pool 1 to
/// 3) it is refused for repeated one-time prekey ids, a replay for counter
/// <= 1, else replaces or extends the pool exactly as the relay's rules
/// say. (Fewer signature checks than [`check_upload`], for speed.)
fn signed_upload(data: &[u8]) {
    let dir = directory();
    let fx = relay_fixture();
    let mut f = Fields(data);
    let counter = f.u64();
    let spk_id = f.u32();
    // A creation time above MAX_TIMESTAMP cannot be signed (from_secret
    // refuses it): the field is masked into range.
    let created = f.u64() & cubbyhole::MAX_TIMESTAMP;
    let flags = f.u8();
    let spk = cubbyhole::SignedPrekey::from_secret(&dir.bob, spk_id, created, [flags | 1; 32])
        .expect("a creation time in range");
    let mut one_time_prekeys = Vec::new();
    while !f.0.is_empty() && one_time_prekeys.len() < 16 {
        let id = f.u32();
        one_time_prekeys.push((id, [f.u8(); 32]));
    }
    let upload = BundleSetUpload {
        device: fx.device,
        counter,
        signed_prekey: SignedPrekeyRecord::of(&spk),
        replace_one_time_prekeys: flags & 1 == 1,
        one_time_prekeys,
        // Upload v2 (SPEC.md 16.6, 16.7) when either is present.
        access_verifier: (flags & 2 == 2).then_some(AccessVerifier([flags; 32])),
        identity_stamp: (flags & 4 == 4).then(|| Stamp {
            epoch: u64::from(counter as u32),
            nonce: counter,
        }),
    };
    let bytes = upload.sign(&dir.bob);
    assert_eq!(
        BundleSetUpload::decode_verified(&bytes).as_ref(),
        Ok(&upload),
        "a signed upload does not decode to itself"
    );
    assert_eq!(
        bytes.len(),
        UPLOAD_FIXED_LEN + 36 * upload.one_time_prekeys.len()
    );

    let mut relay = fx.relay();
    let distinct = upload
        .one_time_prekeys
        .iter()
        .map(|(id, _)| *id)
        .collect::<BTreeSet<_>>()
        .len()
        == upload.one_time_prekeys.len();
    let mut pool: Vec<(u32, [u8; 32])> = if upload.replace_one_time_prekeys {
        Vec::new()
    } else {
        dir.store
            .one_time_prekeys()
            .map(|k| (k.id(), *k.public()))
            .collect()
    };
    for (id, key) in &upload.one_time_prekeys {
        match pool.iter_mut().find(|(p, _)| p == id) {
            Some(entry) => entry.1 = *key,
            None => pool.push((*id, *key)),
        }
    }
    let outcome = relay.publish(NOW, &bytes);
    if !distinct {
        assert_eq!(
            outcome,
            Err(TransportError::BadRequest("duplicate one-time prekey id"))
        );
    } else if counter <= 1 {
        assert_eq!(outcome, Err(TransportError::Replayed));
    } else {
        assert_eq!(outcome, Ok(()));
    }
    if outcome.is_err() {
        pool = dir
            .store
            .one_time_prekeys()
            .map(|k| (k.id(), *k.public()))
            .collect();
    }
    assert_eq!(
        relay.one_time_prekeys_left(&fx.device),
        Ok(pool.len() as u32)
    );
    let bundle = relay.fetch_bundle(NOW, &fx.device).expect("bundle");
    let bundle = PrekeyBundle::decode(&bundle).expect("the relay's bundle decodes");
    assert_eq!(
        bundle.one_time_prekey().map(|(id, key)| (id, *key)),
        pool.first().copied(),
        "the relay handed out another one-time prekey than the oldest"
    );
}

/// `MailboxAuth::decode` (the body of a fetch, the head of an
/// acknowledgement): exactly 133 bytes with a known op decode, canonically;
/// the fixture relay accepts the proof only if it verifies, is Bob's and
/// is over one of his outstanding challenges, and only once.
pub fn decode_mailbox_auth(data: &[u8]) -> Reach {
    let result = decode_bounded("MailboxAuth::decode", data.len(), || {
        MailboxAuth::decode(data)
    });
    let auth = match result {
        Ok(a) => a,
        Err(e @ TransportError::BadRequest(_)) => {
            assert!(
                data.len() != MAILBOX_AUTH_LEN || !matches!(data[36], 1 | 2),
                "a well-formed proof refused"
            );
            return rejected(e);
        }
        Err(e) => panic!("MailboxAuth::decode returned {e:?}"),
    };
    assert!(same(&auth.encode(), data), "proof does not re-encode");
    let verified = auth.verify();
    assert!(matches!(
        verified,
        Ok(()) | Err(TransportError::Unauthorized)
    ));
    let fx = relay_fixture();
    let mut relay = fx.relay();
    let run = |relay: &mut Relay<MemoryRelayStorage>| match auth.op {
        MailboxOp::Fetch => relay.fetch(NOW, &auth, 100).map(|e| e.len()),
        MailboxOp::Acknowledge => relay.acknowledge(NOW, &auth, &[]).map(|()| 0),
    };
    match run(&mut relay) {
        Ok(n) => {
            assert!(
                verified.is_ok(),
                "the relay took a proof that does not verify"
            );
            assert_eq!(auth.device, fx.device);
            assert!(fx.challenges.contains(&auth.challenge));
            if auth.op == MailboxOp::Fetch {
                assert_eq!(n, fx.envelopes.len());
            }
            assert_eq!(
                run(&mut relay),
                Err(TransportError::Unauthorized),
                "a proof was accepted twice"
            );
        }
        Err(TransportError::Unauthorized) => assert!(
            verified.is_err()
                || auth.device != fx.device
                || !fx.challenges.contains(&auth.challenge),
            "the relay refused a valid proof"
        ),
        Err(e) => panic!("the relay answered a proof with {e:?}"),
    }
    Reach::Decoded
}

/// `decode_envelope` (the body of a deposit): canonical; the fixture relay
/// stores it once (a repeat, or an id already pending, changes nothing)
/// and serves it back unchanged.
pub fn decode_envelope(data: &[u8]) -> Reach {
    let result = decode_bounded("decode_envelope", data.len(), || {
        transport::decode_envelope(data)
    });
    let envelope = match result {
        Ok(e) => e,
        Err(e @ TransportError::BadRequest(_)) => return rejected(e),
        Err(e) => panic!("decode_envelope returned {e:?}"),
    };
    assert!(
        same(&encode_envelope(&envelope), data),
        "envelope does not re-encode"
    );
    let fx = relay_fixture();
    let mut relay = fx.relay();
    let before = usage(&relay, &fx.device);
    let duplicate = fx.envelopes.iter().any(|e| e.id == envelope.id);
    let mailbox = fx.device.mailbox();
    let max = relay.config().max_envelope_bytes as usize;
    match relay.deposit(NOW, &mailbox, &envelope, &DepositPass::NONE) {
        Ok(()) => assert!(!envelope.payload.is_empty() && envelope.payload.len() <= max),
        Err(TransportError::LimitExceeded(_)) => {
            assert!(envelope.payload.len() > max);
            return Reach::Decoded;
        }
        Err(TransportError::BadRequest(why)) => {
            assert!(envelope.payload.is_empty(), "refused: {why}");
            assert_eq!(
                usage(&relay, &fx.device),
                before,
                "a refused deposit was stored"
            );
            return Reach::Decoded;
        }
        Err(e) => panic!("deposit returned {e:?}"),
    }
    let after = usage(&relay, &fx.device);
    if duplicate {
        assert_eq!(after, before, "a repeated id was stored again");
    } else {
        assert_eq!(after.envelopes, before.envelopes + 1);
        assert_eq!(after.bytes, before.bytes + envelope.payload.len() as u64);
    }
    assert_eq!(
        relay.deposit(NOW, &mailbox, &envelope, &DepositPass::NONE),
        Ok(())
    );
    assert_eq!(
        usage(&relay, &fx.device),
        after,
        "a retried deposit was stored twice"
    );
    let served = relay.fetch(NOW, &fx.fetch_auth, 100).expect("fetch");
    if duplicate {
        assert_eq!(served, fx.envelopes);
    } else {
        assert_eq!(served.last(), Some(&envelope), "not served as deposited");
        assert_eq!(served.len(), fx.envelopes.len() + 1);
    }
    Reach::Decoded
}

/// `decode_envelope_list` (a fetch answer, parsed by the HTTP client):
/// canonical, bounded allocation, every envelope re-decodes alone.
pub fn decode_envelope_list(data: &[u8]) -> Reach {
    let result = decode_bounded("decode_envelope_list", data.len(), || {
        transport::decode_envelope_list(data)
    });
    let list = match result {
        Ok(l) => l,
        Err(e @ TransportError::BadRequest(_)) => return rejected(e),
        Err(e) => panic!("decode_envelope_list returned {e:?}"),
    };
    assert!(
        same(&encode_envelope_list(&list), data),
        "envelope list does not re-encode"
    );
    let total: usize = list.iter().map(|e| 21 + e.payload.len()).sum();
    assert_eq!(total, data.len());
    for envelope in &list {
        assert_eq!(
            transport::decode_envelope(&encode_envelope(envelope)).as_ref(),
            Ok(envelope)
        );
    }
    Reach::Decoded
}

/// `decode_acknowledge` (the body of an acknowledgement): canonical,
/// bounded allocation; on the fixture relay, an accepted acknowledgement
/// is a valid proof of Bob's, deletes exactly the pending envelopes it
/// names (whose ids then stay known: a redeposit stores nothing), and a
/// refused one changes nothing.
pub fn decode_acknowledge(data: &[u8]) -> Reach {
    let result = decode_bounded("decode_acknowledge", data.len(), || {
        transport::decode_acknowledge(data)
    });
    let (auth, ids) = match result {
        Ok(a) => a,
        Err(e @ TransportError::BadRequest(_)) => return rejected(e),
        Err(e) => panic!("decode_acknowledge returned {e:?}"),
    };
    assert_eq!(
        encode_acknowledge(&auth, &ids).as_deref(),
        Some(data),
        "acknowledgement does not re-encode"
    );
    assert_eq!(data.len(), MAILBOX_AUTH_LEN + 2 + 16 * ids.len());
    let fx = relay_fixture();
    let mut relay = fx.relay();
    let before = usage(&relay, &fx.device);
    let max = relay.config().max_acknowledge_ids as usize;
    match relay.acknowledge(NOW, &auth, &ids) {
        Ok(()) => {
            assert!(ids.len() <= max);
            assert_eq!(auth.op, MailboxOp::Acknowledge);
            assert_eq!(auth.device, fx.device);
            assert!(
                auth.verify().is_ok(),
                "the relay took a proof that does not verify"
            );
            let acknowledged: Vec<&Envelope> = fx
                .envelopes
                .iter()
                .filter(|e| ids.contains(&e.id))
                .collect();
            let bytes: usize = acknowledged.iter().map(|e| e.payload.len()).sum();
            let after = usage(&relay, &fx.device);
            assert_eq!(
                after.envelopes,
                before.envelopes - acknowledged.len() as u64
            );
            assert_eq!(after.bytes, before.bytes - bytes as u64);
            for e in acknowledged {
                assert_eq!(
                    relay.deposit(NOW, &fx.device.mailbox(), e, &DepositPass::NONE),
                    Ok(())
                );
            }
            assert_eq!(
                usage(&relay, &fx.device),
                after,
                "an acknowledged id stored again"
            );
        }
        Err(TransportError::LimitExceeded(_)) => assert!(ids.len() > max),
        Err(TransportError::Unauthorized) => {
            assert_eq!(usage(&relay, &fx.device), before);
        }
        Err(e) => panic!("acknowledge returned {e:?}"),
    }
    Reach::Decoded
}

/// `FetchQuery::decode` (the query of a fetch): it succeeds exactly when
/// every `limit` and `wait_ms` value is 1 to 10 ASCII digits within `u32`;
/// then the last of each counts (defaults 100 and 0), and the canonical
/// encoding decodes to the same query.
pub fn decode_fetch_query(data: &[u8]) -> Reach {
    let Ok(query) = std::str::from_utf8(data) else {
        return Reach::Rejected("not UTF-8".to_string());
    };
    let result = decode_bounded("FetchQuery::decode", data.len(), || {
        FetchQuery::decode(query)
    });
    let pairs = || {
        query
            .split('&')
            .map(|p| p.split_once('=').unwrap_or((p, "")))
            .filter(|(k, _)| *k == "limit" || *k == "wait_ms")
    };
    let decimal = |v: &str| {
        (1..=10).contains(&v.len())
            && v.bytes().all(|b| b.is_ascii_digit())
            && v.parse::<u32>().is_ok()
    };
    let valid = pairs().all(|(_, v)| decimal(v));
    let last = |key: &str| pairs().rfind(|(k, _)| *k == key).map(|(_, v)| v);
    match result {
        Ok(q) => {
            assert!(valid, "accepted a malformed value in {query:?}");
            let expect = |key, default| last(key).map_or(default, |v: &str| v.parse().unwrap_or(0));
            assert_eq!(q.limit, expect("limit", FetchQuery::DEFAULT_LIMIT));
            assert_eq!(q.wait_ms, expect("wait_ms", 0));
            let canonical = q.encode();
            assert_eq!(FetchQuery::decode(&canonical), Ok(q));
        }
        Err(e @ TransportError::BadRequest(_)) => {
            assert!(!valid, "refused {query:?}");
            return rejected(e);
        }
        Err(e) => panic!("FetchQuery::decode returned {e:?}"),
    }
    Reach::Decoded
}

// ---------------------------------------------------------------------------
// two_party
// ---------------------------------------------------------------------------

/// One step of a two-party script.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Alice (`true`) or Bob encrypts a plaintext of `len % 49` bytes (Bob
    /// only once he has a session).
    Send {
        /// Whether Alice sends.
        alice: bool,
        /// Plaintext length (modulo 49).
        len: u8,
    },
    /// The relay delivers the in-flight message at `index % in_flight`.
    Deliver(u8),
    /// The relay drops the in-flight message at `index % in_flight`.
    Drop(u8),
    /// The relay delivers (again) the sent message at `index % sent`, in
    /// flight, dropped or already delivered.
    Replay(u8),
    /// Delivers a corrupted copy of the sent message at `index % sent`:
    /// `how % 4` in {0, 1}: flip bit `(how >> 2) % bits`; 2: truncate to
    /// `(how >> 2) % len` bytes; 3: append the byte `how >> 2`.
    Tamper {
        /// Which sent message.
        index: u8,
        /// The corruption.
        how: u16,
    },
    /// Alice's (`true`) or Bob's session is replaced by
    /// `Session::from_bytes(session.to_bytes())`.
    Restore {
        /// Whether Alice's session is restored.
        alice: bool,
    },
    /// Bob's prekey lifecycle, with `arg = how / 5`, by `how % 5`:
    /// 0: rotate the signed prekey (the old one is retained);
    /// 1: generate `arg % 4 + 1` one-time prekeys;
    /// 2: drop retained signed prekeys (`arg` even: all of them; odd: the
    /// oldest, by id);
    /// 3: withdraw the one-time prekeys with ids below `arg % 8`;
    /// 4: serialize and restore the store (through `PrekeyState`).
    ///
    /// Until Bob has a session, dropping the signed prekey or withdrawing
    /// the one-time prekey Alice's bundle named makes her prekey messages
    /// `unknown_prekey`; once he has one, nothing changes for the session.
    Prekeys(u8),
}

/// Most operations a script runs.
pub const MAX_OPS: usize = 160;
/// Most messages a script sends.
pub const MAX_MESSAGES: usize = 64;

/// Parses fuzzer bytes: first byte the configuration (bit 0: bundle with a
/// one-time prekey; bit 1: small limits, with `max_skip = bits 2..5` and
/// `max_skipped_keys = 2 * bits 5..8`), then one operation per byte (with
/// its arguments in the following bytes), chosen by `code % 10`: 0, 1
/// Alice sends; 2 Bob sends; 3 to 5 deliver; 6 drop; 7 replay; 8 tamper;
/// 9 with bit 6 set: a prekey operation, else restore (bit 7 clear:
/// Alice's session; set: Bob's).
pub fn parse_two_party(data: &[u8]) -> (SessionConfig, bool, Vec<Op>) {
    let Some((&first, mut rest)) = data.split_first() else {
        return (SessionConfig::default(), true, Vec::new());
    };
    let with_opk = first & 1 == 1;
    let config = if first & 2 == 0 {
        SessionConfig::default()
    } else {
        SessionConfig {
            max_skip: u32::from((first >> 2) & 7),
            max_skipped_keys: 2 * u32::from(first >> 5),
        }
    };
    fn take(rest: &mut &[u8]) -> u8 {
        let (&b, tail) = rest.split_first().unwrap_or((&0, &[]));
        *rest = tail;
        b
    }
    let mut ops = Vec::new();
    while !rest.is_empty() && ops.len() < MAX_OPS {
        let code = take(&mut rest);
        ops.push(match code % 10 {
            0 | 1 => Op::Send {
                alice: true,
                len: take(&mut rest),
            },
            2 => Op::Send {
                alice: false,
                len: take(&mut rest),
            },
            3..=5 => Op::Deliver(take(&mut rest)),
            6 => Op::Drop(take(&mut rest)),
            7 => Op::Replay(take(&mut rest)),
            8 => Op::Tamper {
                index: take(&mut rest),
                how: u16::from_be_bytes([take(&mut rest), take(&mut rest)]),
            },
            _ if code & 0x40 != 0 => Op::Prekeys(take(&mut rest)),
            _ => Op::Restore {
                alice: code & 0x80 == 0,
            },
        });
    }
    (config, with_opk, ops)
}

/// The structured two-party target: see [`run_two_party`]. For speed, the
/// restore check runs after the last step (and at every `Restore` op)
/// rather than after every step.
pub fn two_party(data: &[u8]) -> Reach {
    let (config, with_opk, ops) = parse_two_party(data);
    run_two_party(config, with_opk, &ops, false);
    // The script's parser takes any bytes: an input without one operation
    // ran nothing but the setup.
    if ops.is_empty() {
        return Reach::Rejected("no operations".to_string());
    }
    Reach::Decoded
}

/// What the profile says a receiver does with a genuine (untampered)
/// message: a model of the receiving half of the Double Ratchet that tracks
/// only public data (ratchet keys and counters), never keys.
#[derive(Clone, Debug)]
pub struct ReceiverModel {
    /// The current receiving ratchet key.
    pub dhr: Option<[u8; 32]>,
    /// Whether a receiving chain exists.
    pub receiving: bool,
    /// Nr.
    pub nr: u32,
    /// Stored skipped keys, (ratchet key, n), oldest first.
    pub skipped: VecDeque<([u8; 32], u32)>,
    /// Every ratchet key this receiver ever held as `dhr`.
    pub seen: Vec<[u8; 32]>,
}

impl ReceiverModel {
    /// The initiator's receiving side: DHr = SPK_B, no receiving chain.
    pub fn initiator(signed_prekey: [u8; 32]) -> Self {
        ReceiverModel {
            dhr: Some(signed_prekey),
            receiving: false,
            nr: 0,
            skipped: VecDeque::new(),
            seen: vec![signed_prekey],
        }
    }

    /// The responder before its first message.
    pub fn responder() -> Self {
        ReceiverModel {
            dhr: None,
            receiving: false,
            nr: 0,
            skipped: VecDeque::new(),
            seen: Vec::new(),
        }
    }

    /// The profile's ratchet checks, in order, for a genuine message.
    pub fn expect(&self, h: &Header, config: SessionConfig) -> Result<(), Error> {
        let key = h.ratchet_key;
        let max_skip = u64::from(config.max_skip);
        if self.skipped.contains(&(key, h.n)) {
            return Ok(());
        }
        let current = self.dhr == Some(key);
        if (current && h.n < self.nr) || (!current && self.skipped.iter().any(|(k, _)| *k == key)) {
            return Err(Error::Duplicate);
        }
        if current {
            if u64::from(h.n) > u64::from(self.nr) + max_skip {
                return Err(Error::TooManySkipped);
            }
            if !self.receiving {
                return Err(Error::Auth);
            }
            return Ok(());
        }
        if u64::from(h.pn) > u64::from(self.nr) + max_skip || u64::from(h.n) > max_skip {
            return Err(Error::TooManySkipped);
        }
        // A genuine message under a ratchet key never held before is under
        // the peer's next key (derived from our current one); under an
        // older key, its chain was abandoned: the DH ratchet step computes
        // the wrong keys.
        if self.seen.contains(&key) {
            return Err(Error::Auth);
        }
        Ok(())
    }

    /// Applies a message for which [`Self::expect`] gave `Ok`.
    pub fn apply(&mut self, h: &Header, config: SessionConfig) {
        let key = h.ratchet_key;
        if let Some(i) = self.skipped.iter().position(|e| *e == (key, h.n)) {
            self.skipped.remove(i);
            return;
        }
        if self.dhr == Some(key) {
            self.skipped.extend((self.nr..h.n).map(|n| (key, n)));
        } else {
            if self.receiving {
                let old = self.dhr.expect("receiving chain has a key");
                self.skipped.extend((self.nr..h.pn).map(|n| (old, n)));
            }
            self.skipped.extend((0..h.n).map(|n| (key, n)));
            self.dhr = Some(key);
            self.seen.push(key);
            self.receiving = true;
        }
        while self.skipped.len() > config.max_skipped_keys as usize {
            self.skipped.pop_front();
        }
        self.nr = h.n + 1;
    }
}

/// A message of a two-party script.
#[derive(Clone, Debug)]
struct Sent {
    to_bob: bool,
    bytes: Vec<u8>,
    plaintext: Vec<u8>,
    header: Header,
    decrypted: bool,
    deliveries: u32,
}

/// What Bob's prekey store must hold: the expected outcome of every
/// prekey operation, tracked by id only.
#[derive(Clone, Debug)]
struct PrekeyModel {
    /// The current signed prekey id.
    current: u32,
    /// Retained signed prekey ids, oldest first.
    retired: Vec<u32>,
    /// Unused one-time prekey ids.
    one_time: BTreeSet<u32>,
    /// The id of the next generated one-time prekey.
    next_one_time: u32,
}

impl PrekeyModel {
    fn of(store: &PrekeyStore) -> Self {
        let mut signed = store.signed_prekeys().map(|k| k.id());
        PrekeyModel {
            current: signed.next().expect("a current signed prekey"),
            retired: signed.collect(),
            one_time: store.one_time_prekeys().map(|k| k.id()).collect(),
            next_one_time: store.next_one_time_prekey_id(),
        }
    }

    fn holds_signed(&self, id: u32) -> bool {
        self.current == id || self.retired.contains(&id)
    }
}

struct World {
    config: SessionConfig,
    rng: TestRng,
    alice: Session,
    bob: Option<Session>,
    store: PrekeyStore,
    /// The signed and one-time prekey ids of Alice's bundle.
    bundle_prekeys: (u32, Option<u32>),
    prekey_model: PrekeyModel,
    alice_model: ReceiverModel,
    bob_model: ReceiverModel,
    alice_heard_back: bool,
    sent: Vec<Sent>,
    in_flight: Vec<usize>,
}

type Snapshot = (Vec<u8>, Option<Vec<u8>>, Vec<u8>);

impl World {
    fn snapshot(&self) -> Snapshot {
        (
            self.alice.to_bytes().to_vec(),
            self.bob.as_ref().map(|b| b.to_bytes().to_vec()),
            self.store.to_bytes().to_vec(),
        )
    }

    /// Routes a message as an application would: Alice has one session;
    /// Bob's prekey messages go to the session they name, or to the prekey
    /// store if none.
    fn deliver(&mut self, to_bob: bool, bytes: &[u8]) -> Result<Vec<u8>, Error> {
        if !to_bob {
            return self.alice.decrypt(bytes);
        }
        let incoming = Incoming::decode(bytes)?;
        let mut out = Vec::new();
        match &mut self.bob {
            Some(bob) if bob.matches(&incoming) => {
                bob.decrypt_incoming(&incoming, &mut out)?;
                Ok(out)
            }
            _ if incoming.prekey().is_some() => {
                let accepted = self
                    .store
                    .accept(&directory().bob, &incoming, self.config)?;
                assert!(self.bob.is_none(), "a second session was accepted");
                assert_eq!(
                    accepted.consumed_one_time_prekey, self.bundle_prekeys.1,
                    "consumed another one-time prekey than the bundle's"
                );
                if let Some(id) = accepted.consumed_one_time_prekey {
                    self.prekey_model.one_time.remove(&id);
                }
                self.bob = Some(accepted.session);
                Ok(accepted.plaintext)
            }
            // A normal message and no session: the application drops it.
            _ => Err(Error::SessionMismatch),
        }
    }

    fn send(&mut self, alice: bool, len: u8) {
        if self.sent.len() >= MAX_MESSAGES {
            return;
        }
        let index = self.sent.len();
        let plaintext: Vec<u8> = (0..usize::from(len % 49))
            .map(|i| (index * 31 + i) as u8 ^ u8::from(alice))
            .collect();
        let session = if alice {
            assert_eq!(self.alice.sends_prekey_messages(), !self.alice_heard_back);
            &mut self.alice
        } else {
            match &mut self.bob {
                Some(b) => b,
                None => return,
            }
        };
        let bytes = session.encrypt(&mut self.rng, &plaintext).expect("encrypt");
        let incoming = Incoming::decode(&bytes).expect("own message decodes");
        assert_eq!(
            incoming.prekey().is_some(),
            alice && !self.alice_heard_back,
            "wrong message kind"
        );
        let header = *incoming.header();
        self.sent.push(Sent {
            to_bob: alice,
            bytes,
            plaintext,
            header,
            decrypted: false,
            deliveries: 0,
        });
        self.in_flight.push(index);
    }

    fn deliver_genuine(&mut self, index: usize) {
        let msg = self.sent[index].clone();
        let model = if msg.to_bob {
            &self.bob_model
        } else {
            &self.alice_model
        };
        // Before Bob has a session, Alice's prekey messages need the
        // prekeys her bundle named (checked before the ratchet).
        let (spk, opk) = self.bundle_prekeys;
        let prekeys_gone = msg.to_bob
            && self.bob.is_none()
            && !(self.prekey_model.holds_signed(spk)
                && opk.is_none_or(|id| self.prekey_model.one_time.contains(&id)));
        let expected = if prekeys_gone {
            Err(Error::UnknownPrekey)
        } else {
            model.expect(&msg.header, self.config)
        };
        let before = self.snapshot();
        let got = self.deliver(msg.to_bob, &msg.bytes);
        if self.config == SessionConfig::default() && msg.deliveries == 0 && !prekeys_gone {
            // Without eviction or skip limits in reach, every first delivery
            // of a genuine message succeeds, whatever the order (unless Bob
            // withdrew the prekeys before he had a session).
            assert!(
                got.is_ok(),
                "first delivery of message {index} failed: {got:?}"
            );
        }
        match (expected, got) {
            (Ok(()), Ok(plaintext)) => {
                assert_eq!(
                    plaintext, msg.plaintext,
                    "wrong plaintext for message {index}"
                );
                assert!(!msg.decrypted, "message {index} decrypted twice");
                self.sent[index].decrypted = true;
                if msg.to_bob {
                    self.bob_model.apply(&msg.header, self.config);
                } else {
                    self.alice_model.apply(&msg.header, self.config);
                    self.alice_heard_back = true;
                }
            }
            (Err(e), Err(got)) => {
                assert_eq!(got, e, "message {index}: wrong error");
                assert_eq!(
                    self.snapshot(),
                    before,
                    "rejected message {index} changed the state"
                );
            }
            (expected, got) => {
                panic!(
                    "message {index} ({:?}): expected {expected:?}, got {got:?}",
                    msg.header
                )
            }
        }
        self.sent[index].deliveries += 1;
    }

    fn tamper(&mut self, index: usize, how: u16) {
        let msg = &self.sent[index];
        let mut bytes = msg.bytes.clone();
        let arg = usize::from(how >> 2);
        match how % 4 {
            0 | 1 => {
                let bit = arg % (bytes.len() * 8);
                bytes[bit / 8] ^= 1 << (bit % 8);
            }
            2 => bytes.truncate(arg % bytes.len()),
            _ => bytes.push(arg as u8),
        }
        let to_bob = msg.to_bob;
        let before = self.snapshot();
        let got = self.deliver(to_bob, &bytes);
        assert!(got.is_err(), "tampered copy of message {index} accepted");
        assert_eq!(
            self.snapshot(),
            before,
            "rejected tampered message changed the state"
        );
    }

    fn check(&self, restore: bool) {
        let sessions = [
            (Some(&self.alice), &self.alice_model),
            (self.bob.as_ref(), &self.bob_model),
        ];
        for (session, model) in sessions {
            let Some(session) = session else { continue };
            if restore {
                let bytes = session.to_bytes();
                let restored = restore_as(&bytes, session).expect("state restores");
                assert!(
                    same(&restored.to_bytes(), &bytes),
                    "state does not re-encode"
                );
            }
            assert_eq!(
                session.skipped_message_keys(),
                model.skipped.len(),
                "skipped keys"
            );
        }
        assert_eq!(self.alice.sends_prekey_messages(), !self.alice_heard_back);
        let held = PrekeyModel::of(&self.store);
        let model = &self.prekey_model;
        assert_eq!(held.current, model.current, "current signed prekey");
        assert_eq!(held.retired, model.retired, "retained signed prekeys");
        assert_eq!(held.one_time, model.one_time, "one-time prekeys");
        assert_eq!(held.next_one_time, model.next_one_time, "next one-time id");
    }

    /// Applies [`Op::Prekeys`] to Bob's store and to the model.
    fn prekeys(&mut self, how: u8) {
        let bob = &directory().bob;
        let arg = how / 5;
        let model = &mut self.prekey_model;
        match how % 5 {
            0 => {
                self.store
                    .rotate_signed_prekey(&mut self.rng, bob, NOW)
                    .expect("time in unix seconds");
                model.retired.push(model.current);
                model.current = model.current.wrapping_add(1);
            }
            1 => {
                let count = u32::from(arg % 4 + 1);
                let new: Vec<u32> = self
                    .store
                    .generate_one_time_prekeys(&mut self.rng, count)
                    .iter()
                    .map(|k| k.id())
                    .collect();
                let expected: Vec<u32> = (0..count)
                    .map(|i| model.next_one_time.wrapping_add(i))
                    .collect();
                assert_eq!(new, expected, "generated one-time prekey ids");
                model.one_time.extend(&expected);
                model.next_one_time = model.next_one_time.wrapping_add(count);
            }
            2 if arg & 1 == 0 => {
                assert_eq!(
                    self.store.forget_retired_before(u64::MAX),
                    Err(cubbyhole::Error::TimeOutOfRange)
                );
                self.store
                    .forget_retired_before(cubbyhole::MAX_TIMESTAMP)
                    .expect("MAX_TIMESTAMP is in range");
                model.retired.clear();
            }
            2 => match model.retired.first().copied() {
                Some(oldest) => {
                    assert!(self.store.remove_retired_signed_prekey(oldest));
                    model.retired.retain(|id| *id != oldest);
                }
                // The current signed prekey is never dropped.
                None => assert!(!self.store.remove_retired_signed_prekey(model.current)),
            },
            3 => {
                let bound = u32::from(arg % 8);
                let removed = self.store.remove_one_time_prekeys_below(bound);
                let expected = model.one_time.range(..bound).count();
                assert_eq!(removed, expected, "withdrawn one-time prekeys");
                model.one_time.retain(|id| *id >= bound);
            }
            _ => {
                let state = PrekeyState {
                    prekeys: self.store.clone(),
                    upload_counter: u64::from(how),
                    last_rotation: NOW,
                    retired_at: model.retired.iter().map(|id| (*id, NOW)).collect(),
                    one_time_retired: vec![(model.next_one_time, NOW)],
                    upload_pending: how & 1 == 0,
                    accepted: Vec::new(),
                };
                let bytes = state.to_bytes();
                let restored = PrekeyState::from_bytes(&bytes).expect("prekey state restores");
                assert!(
                    same(&restored.to_bytes(), &bytes),
                    "prekey state does not re-encode"
                );
                assert_eq!(restored.retired_at, state.retired_at);
                assert_eq!(restored.one_time_retired, state.one_time_retired);
                self.store = restored.prekeys;
            }
        }
    }
}

/// Runs a two-party script between Alice (initiator, from one of Bob's
/// bundles) and Bob (responder, through his prekey store) over a relay that
/// loses, duplicates, reorders and corrupts messages, and checks after
/// every step:
///
/// - a genuine delivery has exactly the outcome the profile prescribes
///   ([`ReceiverModel`]): the right plaintext at most once, else `duplicate`,
///   `too_many_skipped` or `auth`;
/// - with the default limits, every first delivery succeeds;
/// - a corrupted message is rejected;
/// - a rejection leaves both sessions and the prekey store byte-identical;
/// - Bob's prekey store holds exactly what its lifecycle operations
///   ([`Op::Prekeys`]: rotation, generation, withdrawal, serialization)
///   and the one accepted session leave, and a prekey message whose
///   prekeys were withdrawn before Bob had a session is `unknown_prekey`;
/// - both sessions restore from `to_bytes` and re-encode to the same bytes
///   (after every step if `restore_every_step`, else after the last one).
pub fn run_two_party(config: SessionConfig, with_opk: bool, ops: &[Op], restore_every_step: bool) {
    let dir = directory();
    let mut rng = TestRng::new(0x2B);
    let bundle = if with_opk {
        &dir.with_opk
    } else {
        &dir.without_opk
    };
    let alice = Session::initiate(&mut rng, self::alice(), bundle, config).expect("initiate");
    let mut world = World {
        config,
        rng,
        alice,
        bob: None,
        store: dir.store.clone(),
        bundle_prekeys: (
            bundle.signed_prekey_id(),
            bundle.one_time_prekey().map(|(id, _)| id),
        ),
        prekey_model: PrekeyModel::of(&dir.store),
        alice_model: ReceiverModel::initiator(*bundle.signed_prekey()),
        bob_model: ReceiverModel::responder(),
        alice_heard_back: false,
        sent: Vec::new(),
        in_flight: Vec::new(),
    };
    for op in ops.iter().take(MAX_OPS) {
        match *op {
            Op::Send { alice, len } => world.send(alice, len),
            Op::Deliver(i) if !world.in_flight.is_empty() => {
                let index = world
                    .in_flight
                    .remove(usize::from(i) % world.in_flight.len());
                world.deliver_genuine(index);
            }
            Op::Drop(i) if !world.in_flight.is_empty() => {
                world
                    .in_flight
                    .remove(usize::from(i) % world.in_flight.len());
            }
            Op::Replay(i) if !world.sent.is_empty() => {
                world.deliver_genuine(usize::from(i) % world.sent.len());
            }
            Op::Tamper { index, how } if !world.sent.is_empty() => {
                world.tamper(usize::from(index) % world.sent.len(), how);
            }
            Op::Restore { alice: true } => {
                world.alice = restore_as(&world.alice.to_bytes(), &world.alice).expect("restore");
            }
            Op::Restore { alice: false } => {
                if let Some(bob) = &world.bob {
                    world.bob = Some(restore_as(&bob.to_bytes(), bob).expect("restore"));
                }
            }
            Op::Prekeys(how) => world.prekeys(how),
            _ => {}
        }
        world.check(restore_every_step);
    }
    world.check(true);
}

// ---------------------------------------------------------------------------
// Accounts (issue 15): decode_device_list, device_list_chain,
// decode_account_header, decode_pairing_message, decode_pairing_offer
// ---------------------------------------------------------------------------

/// The device keys of the device-list fixtures: key `i` has seed
/// `[0xD0 ^ i; 32]` and device number `i + 1` unless a script renumbers it.
pub fn device_keys() -> &'static [IdentityKeyPair] {
    static K: OnceLock<Vec<IdentityKeyPair>> = OnceLock::new();
    K.get_or_init(|| {
        (0..MAX_DEVICES as u8)
            .map(|i| IdentityKeyPair::from_seed(&[0xD0 ^ i; 32]))
            .collect()
    })
}

/// A signed list with the crate's builder: `devices` are (key index,
/// device number), `signers` key indices (listed ones).
pub fn build_device_list(
    account: AccountId,
    version: u64,
    previous: [u8; 32],
    devices: &[(usize, u32)],
    signers: &[usize],
) -> DeviceList {
    let keys = device_keys();
    let entries: Vec<DeviceEntry> = devices
        .iter()
        .map(|(k, id)| DeviceEntry {
            identity: *keys[*k].public(),
            device_id: *id,
        })
        .collect();
    let mut u = UnsignedDeviceList::new(account, version, previous, &entries).expect("structure");
    for s in signers {
        u.sign(&keys[*s]).expect("listed signer");
    }
    u.into_list().expect("signed")
}

/// Account A (founded by key 0) at version 2, and a relay that holds it.
pub struct DeviceListFixture {
    /// Account A: `AccountId::of_founder(key 0)`.
    pub account: AccountId,
    /// Version 1: key 0 alone, device 1 (its genesis).
    pub v1: VerifiedDeviceList,
    /// Version 2, the known head: keys 0 and 1 (devices 1 and 2), signed
    /// by both; verified as the successor of v1.
    pub v2: VerifiedDeviceList,
    /// A relay storage holding v1 and v2 of account A, nothing else.
    pub storage: MemoryRelayStorage,
}

/// The shared, deterministic device-list fixture.
pub fn device_list_fixture() -> &'static DeviceListFixture {
    static F: OnceLock<DeviceListFixture> = OnceLock::new();
    F.get_or_init(|| {
        let keys = device_keys();
        let account = AccountId::of_founder(keys[0].public());
        let v1 = DeviceList::genesis(&keys[0], 1)
            .verify_genesis()
            .expect("genesis");
        let v2 = build_device_list(account, 2, *v1.body_hash(), &[(0, 1), (1, 2)], &[0, 1])
            .verify_successor(&v1)
            .expect("v2");
        let mut relay = Relay::new(MemoryRelayStorage::new(), RelayConfig::unpriced());
        relay.publish_device_list(&v1.encode()).expect("v1");
        relay.publish_device_list(&v2.encode()).expect("v2");
        DeviceListFixture {
            account,
            v1,
            v2,
            storage: relay.into_storage(),
        }
    })
}

/// The structure of a decoded list, checked against its bytes: the layout
/// of SPEC.md 25.4 (header, entries in strictly increasing key order with
/// distinct device numbers, signatures in strictly increasing index order),
/// and the encoding is canonical.
fn check_list_bytes(data: &[u8], list: &DeviceList) {
    assert!(same(&list.encode(), data), "device list does not re-encode");
    let n = list.devices().len();
    let s = list.signatures().len();
    assert!((1..=MAX_DEVICES).contains(&n) && (1..=n).contains(&s));
    assert_eq!(data.len(), 74 + 36 * n + 1 + 65 * s, "device list length");
    assert_eq!(data[0], 0x01);
    assert_eq!(&data[1..33], list.account_id().as_bytes());
    assert_eq!(data[33..41], list.version().to_be_bytes());
    assert!(list.version() >= 1);
    assert_eq!(&data[41..73], list.previous());
    assert_eq!(usize::from(data[73]), n);
    for (i, d) in list.devices().iter().enumerate() {
        let at = 74 + 36 * i;
        assert_eq!(&data[at..at + 32], d.identity.as_bytes());
        assert_eq!(data[at + 32..at + 36], d.device_id.to_be_bytes());
        for e in &list.devices()[i + 1..] {
            assert!(d.identity.as_bytes() < e.identity.as_bytes(), "key order");
            assert_ne!(d.device_id, e.device_id, "a device number twice");
        }
    }
    assert!(same(list.body(), &data[..74 + 36 * n]));
    assert_eq!(
        list.body_hash(),
        &cubbyhole::devices::list_hash(list.body())
    );
    assert_eq!(usize::from(data[74 + 36 * n]), s);
    for (j, (index, signature)) in list.signatures().iter().enumerate() {
        let at = 74 + 36 * n + 1 + 65 * j;
        assert_eq!(data[at], *index);
        assert_eq!(&data[at + 1..at + 65], &signature[..]);
        assert!(usize::from(*index) < n);
        if j > 0 {
            assert!(list.signatures()[j - 1].0 < *index, "signature order");
        }
    }
    assert_eq!(list.signers().count(), s);
    assert_eq!(DeviceList::decode(data).as_ref(), Ok(list));
}

/// Whether any signer of `list` is a device of `of`.
fn signed_by_one_of(list: &DeviceList, of: &DeviceList) -> bool {
    list.signers().any(|s| of.device(&s.identity).is_some())
}

/// The error kind (SPEC.md 25.6) SPEC.md 25.5 prescribes for
/// `list.verify_successor(prev)`, given whether the list's signatures
/// verify; "ok" if it is a valid successor. A model: written from the
/// spec's order of checks, not from the implementation.
fn successor_model(list: &DeviceList, prev: &DeviceList, signatures_ok: bool) -> &'static str {
    if list.account_id() != prev.account_id() {
        return "wrong_account";
    }
    match list.version().cmp(&(prev.version() + 1)) {
        std::cmp::Ordering::Less => return "stale",
        std::cmp::Ordering::Greater => return "gap",
        std::cmp::Ordering::Equal => {}
    }
    if !signatures_ok {
        return "bad_signature";
    }
    if list.previous() != prev.body_hash() {
        return if signed_by_one_of(list, prev) {
            "conflict"
        } else {
            "unauthorized"
        };
    }
    for d in list.devices() {
        match prev.device(&d.identity) {
            Some(kept) if kept.device_id != d.device_id => return "device_id_changed",
            Some(_) => {}
            None if prev.devices().iter().any(|p| p.device_id == d.device_id) => {
                return "device_id_reused"
            }
            None => {}
        }
    }
    if !signed_by_one_of(list, prev) {
        return "unauthorized";
    }
    let signed: BTreeSet<[u8; 32]> = list.signers().map(|s| *s.identity.as_bytes()).collect();
    let added_unsigned = list
        .devices()
        .iter()
        .any(|d| prev.device(&d.identity).is_none() && !signed.contains(d.identity.as_bytes()));
    if added_unsigned {
        return "unauthorized";
    }
    "ok"
}

/// The error kind SPEC.md 25.5 prescribes for `list.verify_genesis()`.
fn genesis_model(list: &DeviceList, signatures_ok: bool) -> &'static str {
    let devices = list.devices();
    if list.version() != 1 || list.previous() != &[0; 32] || devices.len() != 1 {
        return "not_genesis";
    }
    if AccountId::of_founder(&devices[0].identity) != *list.account_id() {
        return "wrong_account";
    }
    if !signatures_ok {
        return "bad_signature";
    }
    "ok"
}

fn kind_of<T>(result: &Result<T, DeviceListError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(e) => e.profile_kind(),
    }
}

/// The relay's answer for a refusal of kind `kind` (SPEC.md 25.12's
/// table, written out here).
fn relay_answer(kind: &str) -> Result<(), TransportError> {
    use cubbyhole::relay::device_list_reason as r;
    Err(match kind {
        "ok" => return Ok(()),
        "stale" => TransportError::Replayed,
        "conflict" => TransportError::Conflict,
        "bad_signature" | "unauthorized" => TransportError::Unauthorized,
        "not_genesis" => TransportError::BadRequest(r::NOT_GENESIS),
        "wrong_account" => TransportError::BadRequest(r::WRONG_ACCOUNT),
        "gap" => TransportError::BadRequest(r::GAP),
        "device_id_changed" => TransportError::BadRequest(r::DEVICE_ID_CHANGED),
        "device_id_reused" => TransportError::BadRequest(r::DEVICE_ID_REUSED),
        _ => TransportError::BadRequest(r::MALFORMED),
    })
}

/// What SPEC.md 25.12 says the relay answers to `list` given the versions
/// it stores for the list's account (`stored[i]` is version `i + 1`, each
/// verified), and whether the relay then stores it as a new head.
fn relay_model(
    stored: &[VerifiedDeviceList],
    list: &DeviceList,
    signatures_ok: bool,
) -> (Result<(), TransportError>, bool) {
    let Some(head) = stored.last() else {
        let kind = genesis_model(list, signatures_ok);
        return (relay_answer(kind), kind == "ok");
    };
    let version = list.version();
    if version > head.version() {
        let kind = successor_model(list, head, signatures_ok);
        return (relay_answer(kind), kind == "ok");
    }
    let held = &stored[version as usize - 1];
    if held.body() == list.body() {
        return (Ok(()), false);
    }
    // Another body of a held version: a conflict if it is authentic.
    let kind = match version {
        1 => genesis_model(list, signatures_ok),
        _ => successor_model(list, &stored[version as usize - 2], signatures_ok),
    };
    let answer = match kind {
        "ok" | "conflict" => Err(TransportError::Conflict),
        other => relay_answer(other),
    };
    (answer, false)
}

/// The checks every decoded (or built) list goes through against the
/// fixture's head v2: `verify_genesis`, `verify_successor` (of v1 and of
/// v2) and `accept_unverified` give exactly the spec's outcome; a verified
/// successor keeps every kept device's number; `DeviceListChain::accept`
/// with v2 known (or nothing known) agrees with them and never answers a
/// head below v2.
fn check_list_verdicts(list: &DeviceList) -> bool {
    let fx = device_list_fixture();
    let unverified = list.accept_unverified();
    let signatures_ok = match &unverified {
        Ok(v) => {
            assert_eq!(v.list(), list);
            assert!(v.parent().is_none());
            true
        }
        Err(DeviceListError::BadSignature) => false,
        Err(e) => panic!("accept_unverified returned {e:?}"),
    };

    let genesis = list.verify_genesis();
    assert_eq!(kind_of(&genesis), genesis_model(list, signatures_ok));
    if let Ok(g) = &genesis {
        assert_eq!(g.list(), list);
        assert!(g.parent().is_none());
    }

    for prev in [&fx.v1, &fx.v2] {
        let successor = list.verify_successor(prev);
        assert_eq!(
            kind_of(&successor),
            successor_model(list, prev, signatures_ok),
            "verify_successor of version {}",
            prev.version()
        );
        match &successor {
            Ok(s) => {
                assert_eq!(s.list(), list);
                assert_eq!(s.parent(), Some(prev.list()));
                for d in list.devices() {
                    if let Some(kept) = prev.device(&d.identity) {
                        assert_eq!(kept.device_id, d.device_id, "a kept device renumbered");
                    }
                }
            }
            Err(DeviceListError::Conflict { ours, theirs }) => {
                assert_eq!(**ours, *prev.list());
                assert_eq!(**theirs, *list);
            }
            Err(_) => {}
        }
    }

    // The contact side, one list offered.
    let offered = std::slice::from_ref(list);
    let chain = DeviceListChain::accept(Some(&fx.v2), offered);
    if let Ok(accepted) = &chain {
        let head = accepted.head().map_or(fx.v2.version(), |h| h.version());
        assert!(
            head >= fx.v2.version(),
            "accept went back to version {head}"
        );
    }
    if list.account_id() != &fx.account {
        assert_eq!(kind_of(&chain), "wrong_account");
    } else if list.version() < 2 || list.body() == fx.v2.body() {
        assert_eq!(chain.map(|a| a.new), Ok(Vec::new()));
    } else if list.version() == 2 {
        // A sibling of the head: refused, a conflict if authentic.
        let authentic = successor_model(list, &fx.v1, signatures_ok);
        let expected = if authentic == "ok" {
            "conflict"
        } else {
            authentic
        };
        assert_eq!(kind_of(&chain), expected, "a sibling of the head");
    } else {
        let expected = successor_model(list, &fx.v2, signatures_ok);
        assert_eq!(kind_of(&chain), expected);
        if let Ok(accepted) = chain {
            assert_eq!(accepted.new.len(), 1);
            assert_eq!(accepted.new[0].list(), list);
        }
    }
    let fresh = DeviceListChain::accept(None, offered);
    let expected = match list.version() {
        1 => genesis_model(list, signatures_ok),
        _ => "gap",
    };
    assert_eq!(kind_of(&fresh), expected, "accept with nothing known");
    signatures_ok
}

/// The relay's model state of `decode_device_list` and
/// `device_list_chain`: the verified versions it stores per account.
struct RelayLists(Vec<(AccountId, Vec<VerifiedDeviceList>)>);

impl RelayLists {
    fn fixture() -> Self {
        let fx = device_list_fixture();
        RelayLists(vec![(fx.account, vec![fx.v1.clone(), fx.v2.clone()])])
    }

    fn stored(&mut self, account: &AccountId) -> &mut Vec<VerifiedDeviceList> {
        if let Some(i) = self.0.iter().position(|(a, _)| a == account) {
            return &mut self.0[i].1;
        }
        self.0.push((*account, Vec::new()));
        &mut self.0.last_mut().expect("just pushed").1
    }

    /// Publishes `bytes` (which decode to `list`) and checks the relay's
    /// answer and what it then serves against the model.
    fn publish(
        &mut self,
        relay: &mut Relay<MemoryRelayStorage>,
        bytes: &[u8],
        list: &DeviceList,
        signatures_ok: bool,
    ) {
        let stored = self.stored(list.account_id());
        let (expected, appended) = relay_model(stored, list, signatures_ok);
        let answer = relay.publish_device_list(bytes);
        assert_eq!(
            answer,
            expected,
            "the relay's answer to version {}",
            list.version()
        );
        if appended {
            let verified = match stored.last() {
                Some(head) => list.verify_successor(head),
                None => list.verify_genesis(),
            };
            stored.push(verified.expect("the model appended a valid list"));
            assert_eq!(
                relay.publish_device_list(bytes),
                Ok(()),
                "a stored list published again"
            );
        }
        let served = relay.fetch_device_lists(list.account_id(), 0);
        if stored.is_empty() {
            assert_eq!(served, Err(TransportError::NotFound));
        } else {
            let expected: Vec<Vec<u8>> = stored.iter().map(|l| l.encode()).collect();
            assert_eq!(served, Ok(expected), "the relay serves what it stored");
        }
    }
}

/// `DeviceList::decode` (a list from the directory, from the body of
/// `PUT /v1/accounts/{account}/devices`, or in-band): only `Malformed`,
/// bounded allocation, canonical (see [`check_list_bytes`]); then the
/// verdicts of the verifier and of the contact's chain against the fixture
/// head ([`check_list_verdicts`]), and the relay holding v1 and v2 answers
/// the upload exactly as SPEC.md 25.12 says and serves what it stored.
pub fn decode_device_list(data: &[u8]) -> Reach {
    let list = match decode_bounded("DeviceList::decode", data.len(), || {
        DeviceList::decode(data)
    }) {
        Ok(l) => l,
        Err(e @ DeviceListError::Malformed) => return rejected(e),
        Err(e) => panic!("DeviceList::decode returned {e:?}"),
    };
    check_list_bytes(data, &list);
    let signatures_ok = check_list_verdicts(&list);
    let mut relay = Relay::new(
        device_list_fixture().storage.clone(),
        RelayConfig::unpriced(),
    );
    RelayLists::fixture().publish(&mut relay, data, &list, signatures_ok);
    Reach::Decoded
}

/// Most lists a [`device_list_chain`] script builds.
pub const MAX_CHAIN_LISTS: usize = 4;

/// Lists built from fuzzer fields, signed, for `device_list_chain`: six
/// bytes a list (zeros once they run out), at most [`MAX_CHAIN_LISTS`]:
///
/// - `flags`: bits 0-2 the version (0 to 7); bit 3 account B (founded by
///   key 2) instead of A; bits 4-5 `previous`: 0 the hash of the list
///   built before (v2's for the first), 1 v1's hash, 2 zero, 3 v2's hash;
///   bit 6 flip a bit of the last signature; bit 7 renumber one device;
/// - `devices` (2): bit `i` lists key `i` (device number `i + 1`);
/// - `signers` (2): bit `i`: key `i` signs (if listed);
/// - `renumber`: device `renumber & 15` gets number `(renumber >> 4) + 1`.
///
/// Returns each list's bytes, the list, and whether its signatures are
/// intact; fields the builder refuses (no device, version 0, a number
/// twice, no signer) are checked to be refused and build nothing.
fn chain_lists(data: &[u8]) -> Vec<(Vec<u8>, DeviceList, bool)> {
    let fx = device_list_fixture();
    let keys = device_keys();
    let account_b = AccountId::of_founder(keys[2].public());
    let mut f = Fields(data);
    let mut out: Vec<(Vec<u8>, DeviceList, bool)> = Vec::new();
    let mut before = *fx.v2.body_hash();
    while !f.0.is_empty() && out.len() < MAX_CHAIN_LISTS {
        let flags = f.u8();
        let devices = u16::from_be_bytes(f.array());
        let signers = u16::from_be_bytes(f.array());
        let renumber = f.u8();
        let version = u64::from(flags & 7);
        let account = if flags & 8 == 0 {
            fx.account
        } else {
            account_b
        };
        let previous = match (flags >> 4) & 3 {
            0 => before,
            1 => *fx.v1.body_hash(),
            2 => [0; 32],
            _ => *fx.v2.body_hash(),
        };
        let mut entries: Vec<(usize, u32)> = (0..MAX_DEVICES)
            .filter(|i| devices & (1 << i) != 0)
            .map(|i| (i, i as u32 + 1))
            .collect();
        if flags & 0x80 != 0 {
            let who = usize::from(renumber & 15);
            for e in entries.iter_mut().filter(|(k, _)| *k == who) {
                e.1 = u32::from(renumber >> 4) + 1;
            }
        }
        let numbers: BTreeSet<u32> = entries.iter().map(|(_, id)| *id).collect();
        let well_formed = !entries.is_empty() && version >= 1 && numbers.len() == entries.len();
        let signing: Vec<usize> = entries
            .iter()
            .map(|(k, _)| *k)
            .filter(|k| signers & (1 << k) != 0)
            .collect();
        let entry_list: Vec<DeviceEntry> = entries
            .iter()
            .map(|(k, id)| DeviceEntry {
                identity: *keys[*k].public(),
                device_id: *id,
            })
            .collect();
        let unsigned = UnsignedDeviceList::new(account, version, previous, &entry_list);
        let Ok(mut unsigned) = unsigned else {
            assert!(!well_formed, "the builder refused a well-formed list");
            assert_eq!(unsigned.err(), Some(DeviceListError::Malformed));
            continue;
        };
        assert!(well_formed, "the builder took a malformed list");
        for s in &signing {
            unsigned.sign(&keys[*s]).expect("a listed signer");
        }
        // An unlisted key cannot sign.
        if let Some(stranger) = (0..MAX_DEVICES).find(|k| !entries.iter().any(|(e, _)| e == k)) {
            assert_eq!(
                unsigned.clone().sign(&keys[stranger]),
                Err(DeviceListError::Unauthorized)
            );
        }
        let list = match unsigned.into_list() {
            Ok(l) => l,
            Err(e) => {
                assert!(signing.is_empty() && e == DeviceListError::Unauthorized);
                continue;
            }
        };
        before = *list.body_hash();
        let mut bytes = list.encode();
        let intact = flags & 0x40 == 0;
        if !intact {
            let last = bytes.len() - 1;
            bytes[last] ^= 0x01;
        }
        let decoded = DeviceList::decode(&bytes).expect("a built list decodes");
        check_list_bytes(&bytes, &decoded);
        if intact {
            assert_eq!(decoded, list, "a built list does not decode to itself");
        }
        out.push((bytes, decoded, intact));
    }
    out
}

/// Structured device lists (see [`chain_lists`]): built with the crate's
/// API from fuzzer fields and signed, so the fuzzer reaches past the
/// signatures. Each list goes through [`check_list_verdicts`]; the
/// sequence is offered to `DeviceListChain::accept` with v2 known: it
/// succeeds only if every list is of account A and every version-2 list is
/// v2, the new lists are exactly the offered lists above v2, each the
/// valid successor of the one before (kept devices keep their numbers),
/// the head never goes below v2; offered again to the new head, nothing is
/// new; in reverse order, the same outcome. Then the relay holding v1 and
/// v2 takes the lists in script order, exactly as SPEC.md 25.12 says.
pub fn device_list_chain(data: &[u8]) -> Reach {
    let fx = device_list_fixture();
    let built = chain_lists(data);
    for (_, list, intact) in &built {
        assert_eq!(check_list_verdicts(list), *intact, "signature verdict");
    }
    let offered: Vec<DeviceList> = built.iter().map(|(_, l, _)| l.clone()).collect();
    let result = DeviceListChain::accept(Some(&fx.v2), &offered);
    // In another order: the same outcome (the same new bodies, or an
    // error; the same error kind if the versions are distinct: with
    // several lists of one version failing, which one is reported may
    // differ). Seed same-body-bad-copy: a copy of a valid list with a
    // broken signature, before or after the valid one.
    let versions: BTreeSet<u64> = offered.iter().map(|l| l.version()).collect();
    let distinct = versions.len() == offered.len();
    let mut reversed = offered.clone();
    reversed.reverse();
    let again = DeviceListChain::accept(Some(&fx.v2), &reversed);
    match &result {
        Ok(accepted) => {
            assert!(offered.iter().all(|l| l.account_id() == &fx.account));
            assert!(offered
                .iter()
                .all(|l| l.version() != 2 || l.body() == fx.v2.body()));
            let mut head = &fx.v2;
            for new in &accepted.new {
                assert_eq!(new.version(), head.version() + 1, "versions in a row");
                assert_eq!(new.parent(), Some(head.list()));
                assert_eq!(
                    kind_of(&new.verify_successor(head)),
                    "ok",
                    "a new list is not a valid successor"
                );
                for d in new.devices() {
                    if let Some(kept) = head.device(&d.identity) {
                        assert_eq!(kept.device_id, d.device_id, "a kept device renumbered");
                    }
                }
                assert!(offered.iter().any(|l| l == new.list()));
                head = new;
            }
            assert!(head.version() >= fx.v2.version());
            for l in &offered {
                if l.version() > fx.v2.version() {
                    let took = accepted.new.iter().any(|n| n.body() == l.body());
                    assert!(took, "an offered list above the head was dropped");
                }
            }
            let repeat = DeviceListChain::accept(Some(head), &offered);
            assert_eq!(repeat.map(|a| a.new), Ok(Vec::new()), "accepted twice");
            let again = again.expect("the same lists in another order");
            let bodies = |a: &[VerifiedDeviceList]| -> Vec<Vec<u8>> {
                a.iter().map(|n| n.body().to_vec()).collect()
            };
            assert_eq!(
                bodies(&again.new),
                bodies(&accepted.new),
                "order changed the heads"
            );
        }
        Err(e) => {
            assert!(again.is_err(), "order changed the outcome");
            if distinct {
                assert_eq!(
                    kind_of(&again),
                    e.profile_kind(),
                    "order changed the outcome"
                );
            }
            // A conflict: another list of a held version, or a list of
            // the next one signed by a device of the head that does not
            // extend it.
            if let DeviceListError::Conflict { ours, theirs } = e {
                let next = theirs.version() == ours.version() + 1;
                assert!(theirs.version() == ours.version() || next);
                assert!(next || ours.body() != theirs.body());
                assert!(!next || theirs.previous() != ours.body_hash());
                assert!(signed_by_one_of(theirs, ours) || !next);
                assert!(offered.iter().any(|l| l == &**theirs));
            }
        }
    }

    let mut relay = Relay::new(fx.storage.clone(), RelayConfig::unpriced());
    let mut model = RelayLists::fixture();
    for (bytes, list, intact) in &built {
        model.publish(&mut relay, bytes, list, *intact);
    }
    Reach::Decoded
}

/// `AccountHeader::decode` (the start of every account message's body,
/// decrypted from an authenticated but possibly malicious peer): it takes
/// exactly the inputs of 73 bytes or more with the magic and kind 1 or 2;
/// then the header re-encodes with the body to exactly the input. The
/// header built from the same fields (a zero `previous` is none) decodes
/// back to itself and the body.
pub fn decode_account_header(data: &[u8]) -> Reach {
    let decoded = decode_bounded("AccountHeader::decode", data.len(), || {
        AccountHeader::decode(data)
    });
    let well_formed = data.len() >= ACCOUNT_HEADER_LEN
        && data[..8] == *b"\x00chacct1"
        && matches!(data[8], 1 | 2);
    let reach = match decoded {
        None => {
            assert!(!well_formed, "a well-formed account header refused");
            Reach::Rejected("None".to_string())
        }
        Some((header, body)) => {
            assert!(well_formed, "a malformed account header decoded");
            assert!(same(body, &data[ACCOUNT_HEADER_LEN..]), "the body");
            assert!(
                same(&header.encode(body), data),
                "account header does not re-encode"
            );
            assert_eq!(header.sent_copy, data[8] == 2);
            assert!(!PairingMessage::is_pairing(data));
            Reach::Decoded
        }
    };
    // Encode then decode, from fields read out of the input.
    let mut f = Fields(data);
    let previous: [u8; 16] = f.array();
    let header = AccountHeader {
        sent_copy: f.u8() & 1 == 1,
        message: MessageId(f.array()),
        to: AccountId(f.array()),
        previous: (previous != [0; 16]).then_some(MessageId(previous)),
    };
    let body = f.0;
    let bytes = header.encode(body);
    assert_eq!(bytes.len(), ACCOUNT_HEADER_LEN + body.len());
    assert_eq!(
        AccountHeader::decode(&bytes),
        Some((header, body)),
        "an account header does not decode to itself"
    );
    reach
}

/// `PairingMessage::decode` (the body of a pairing message, decrypted from
/// an authenticated but possibly malicious peer): only `Malformed`,
/// bounded allocation; a decoded message re-encodes to exactly its input,
/// its list to its bytes inside, its account is the list's, at most
/// `MAX_PAIRING_CONTACTS` contacts; Debug does not print the code.
pub fn decode_pairing_message(data: &[u8]) -> Reach {
    let message = match decode_bounded("PairingMessage::decode", data.len(), || {
        PairingMessage::decode(data)
    }) {
        Ok(m) => m,
        Err(e @ PairingRefusal::Malformed) => {
            return rejected(e);
        }
        Err(e) => panic!("PairingMessage::decode returned {e:?}"),
    };
    assert!(PairingMessage::is_pairing(data));
    assert!(
        same(&message.encode(), data),
        "pairing message does not re-encode"
    );
    let list = message.list.encode();
    let n = message.contacts.len();
    assert!(n <= MAX_PAIRING_CONTACTS);
    assert_eq!(
        data.len(),
        8 + 1 + 16 + 32 + 16 + 2 + list.len() + 2 + 73 * n
    );
    assert_eq!(&data[25..57], message.list.account_id().as_bytes());
    assert_eq!(data[57..73], message.code[..]);
    assert_eq!(data[73..75], (list.len() as u16).to_be_bytes());
    assert!(same(&data[75..75 + list.len()], &list));
    assert_eq!(message.message.0, data[9..25]);
    let debug = format!("{message:?}");
    assert!(debug.contains("<redacted>") && !debug.contains(&format!("{:?}", &message.code[..])));
    assert_eq!(
        AccountHeader::decode(data),
        None,
        "a pairing message read as an account message"
    );
    Reach::Decoded
}

/// `PairingOffer::decode` (what a new device shows; typed in or scanned):
/// the checks in their documented order (length, format byte, identity
/// key); a decoded offer re-encodes to exactly its input, expires at 0,
/// and its Debug does not print the code.
pub fn decode_pairing_offer(data: &[u8]) -> Reach {
    let result = decode_bounded("PairingOffer::decode", data.len(), || {
        PairingOffer::decode(data)
    });
    let expected = if data.len() != PAIRING_PAYLOAD_LEN {
        Err(PayloadError::Length(data.len()))
    } else if data[0] != 0x01 {
        Err(PayloadError::Format(data[0]))
    } else if IdentityKey::from_bytes(&data[1..33]).is_err() {
        Err(PayloadError::IdentityKey)
    } else {
        Ok(())
    };
    let offer = match result {
        Err(e) => {
            assert_eq!(Err(e), expected, "the offer's checks in order");
            return rejected(e);
        }
        Ok(offer) => offer,
    };
    assert_eq!(expected, Ok(()));
    assert!(same(&offer.encode(), data), "offer does not re-encode");
    assert_eq!(offer.expires_at, 0);
    assert_eq!(offer.device.identity, data[1..33]);
    assert_eq!(offer.device.device_id.to_be_bytes(), data[33..37]);
    let debug = format!("{offer:?}");
    assert!(debug.contains("<redacted>") && !debug.contains(&format!("{:?}", &offer.code[..])));
    Reach::Decoded
}

// ---------------------------------------------------------------------------
// sealed (profile v2)
// ---------------------------------------------------------------------------

/// The routing window of the v2 fixture (SPEC 26.6's default).
const SEALED_WINDOW: u32 = 32;

/// A live profile v2 session pair (SPEC 26) after some traffic, and its
/// envelopes as (id, payload).
pub struct SealedFixture {
    /// Alice: has heard back, holds a skipped key of Bob's first chain.
    pub alice: Session,
    /// Bob: holds a skipped key of Alice's second chain.
    pub bob: Session,
    /// Every envelope sent, in order.
    pub sent: Vec<([u8; 16], Vec<u8>)>,
    /// Envelopes never delivered: Bob's next (a new chain) and Alice's
    /// next; the skipped ones are in `sent`.
    pub undelivered: Vec<([u8; 16], Vec<u8>)>,
}

/// The shared, deterministic v2 session pair of `sealed`.
pub fn sealed_fixture() -> &'static SealedFixture {
    static F: OnceLock<SealedFixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = directory();
        let mut rng = TestRng::new(0x5EA1);
        let config = SessionConfig::default();
        let mut a =
            Session::initiate_sealed(&mut rng, alice(), &dir.with_opk, config).expect("initiate");
        let mut store = dir.store.clone();
        let mut sent = Vec::new();
        let mut seal = |s: &mut Session, rng: &mut TestRng, text: &[u8]| {
            let m = s.seal(rng, text).expect("seal");
            sent.push((m.id, m.payload.clone()));
            m
        };
        let open = |s: &mut Session, m: &cubbyhole::Sealed| {
            let mut out = Vec::new();
            s.open(&m.id, &m.payload, SEALED_WINDOW, &mut out)
                .expect("open");
            out
        };
        let first = seal(&mut a, &mut rng, b"hello Bob");
        let inner = store.open_sealed(&first.payload).expect("open_sealed");
        let mut b = store
            .accept(&dir.bob, &Incoming::decode(&inner).expect("decode"), config)
            .expect("accept")
            .session;
        let b0 = seal(&mut b, &mut rng, b"b0");
        let _b1 = seal(&mut b, &mut rng, b"b1 (skipped)");
        let b2 = seal(&mut b, &mut rng, &[0x42; 600]);
        open(&mut a, &b0);
        open(&mut a, &b2);
        let _a0 = seal(&mut a, &mut rng, b"a0 (skipped)");
        let a1 = seal(&mut a, &mut rng, b"a1");
        open(&mut b, &a1);
        let undelivered = [
            b.seal(&mut rng, b"b3").expect("seal"),
            a.seal(&mut rng, b"a2").expect("seal"),
        ]
        .into_iter()
        .map(|m| (m.id, m.payload))
        .collect();
        SealedFixture {
            alice: a,
            bob: b,
            sent,
            undelivered,
        }
    })
}

/// Arbitrary bytes as an envelope: the first 16 bytes are the envelope id
/// (zero-padded), the rest the payload. The payload goes to
/// `PrekeyStore::open_sealed` of Bob's fixture store (only `Decode`,
/// `InvalidKey` or `Auth`; what opens goes on to `accept`), and with the id
/// to `Session::open` of both sides of a live v2 pair: a rejection leaves
/// the session and the output byte-identical; an opened envelope changes
/// the state, which restores, and the same envelope is then refused
/// (`SessionMismatch`: its tag was single-use) without a change.
pub fn sealed(data: &[u8]) -> Reach {
    let (head, payload) = data.split_at(data.len().min(16));
    let mut id = [0u8; 16];
    id[..head.len()].copy_from_slice(head);
    let dir = directory();
    let sealed_decoded = match dir.store.open_sealed(payload) {
        Ok(inner) => {
            let mut store = dir.store.clone();
            if let Ok(incoming) = Incoming::decode(&inner) {
                let _ = store.accept(&dir.bob, &incoming, SessionConfig::default());
            }
            true
        }
        Err(Error::Decode(_)) => false,
        Err(Error::InvalidKey | Error::Auth) => true,
        Err(e) => panic!("open_sealed: {e:?}"),
    };
    let fx = sealed_fixture();
    let mut chain_error = None;
    for receiver in [&fx.alice, &fx.bob] {
        let mut session = receiver.clone();
        let before = session.to_bytes();
        let mut out = vec![0xEE];
        match session.open(&id, payload, SEALED_WINDOW, &mut out) {
            Err(Error::State(e)) => panic!("open returned a state error: {e}"),
            Err(e) => {
                assert!(
                    same(&session.to_bytes(), &before),
                    "rejected envelope changed the state"
                );
                assert_eq!(out, [0xEE], "rejected envelope changed the output");
                if matches!(
                    e,
                    Error::Decode("chain message length" | "kind" | "version")
                ) {
                    chain_error = Some(e);
                }
            }
            Ok(()) => {
                assert_eq!(out.first(), Some(&0xEE), "output not appended");
                let after = session.to_bytes();
                assert!(
                    !same(&after, &before),
                    "opened envelope did not change the state"
                );
                let restored = restore_as(&after, &session).expect("state after open restores");
                assert!(same(&restored.to_bytes(), &after));
                assert_eq!(
                    session.open(&id, payload, SEALED_WINDOW, &mut out),
                    Err(Error::SessionMismatch),
                    "envelope opened twice"
                );
                assert!(
                    same(&session.to_bytes(), &after),
                    "rejected replay changed the state"
                );
            }
        }
    }
    match chain_error {
        Some(e) if !sealed_decoded => rejected(e),
        _ => Reach::Decoded,
    }
}

// ---------------------------------------------------------------------------
// Seed corpora
// ---------------------------------------------------------------------------

/// The names of every target, as in `fuzz/fuzz_targets/`.
pub const TARGETS: [&str; 23] = [
    "decode_incoming",
    "decode_bundle",
    "decode_state",
    "decrypt_session",
    "accept_prekey",
    "two_party",
    "decode_prekeys",
    "decode_prekey_state",
    "decode_identity",
    "decode_upload",
    "decode_mailbox_auth",
    "decode_envelope",
    "decode_envelope_list",
    "decode_acknowledge",
    "decode_fetch_query",
    "decode_frame",
    "decode_record",
    "decode_device_list",
    "device_list_chain",
    "decode_account_header",
    "decode_pairing_message",
    "decode_pairing_offer",
    "sealed",
];

/// Runs the target called `name` on `data`; returns how far it got.
pub fn run(name: &str, data: &[u8]) -> Reach {
    match name {
        "decode_incoming" => decode_incoming(data),
        "decode_bundle" => decode_bundle(data),
        "decode_state" => decode_state(data),
        "decrypt_session" => decrypt_session(data),
        "accept_prekey" => accept_prekey(data),
        "two_party" => two_party(data),
        "decode_prekeys" => decode_prekeys(data),
        "decode_prekey_state" => decode_prekey_state(data),
        "decode_identity" => decode_identity(data),
        "decode_upload" => decode_upload(data),
        "decode_mailbox_auth" => decode_mailbox_auth(data),
        "decode_envelope" => decode_envelope(data),
        "decode_envelope_list" => decode_envelope_list(data),
        "decode_acknowledge" => decode_acknowledge(data),
        "decode_fetch_query" => decode_fetch_query(data),
        "decode_frame" => decode_frame(data),
        "decode_record" => decode_record(data),
        "decode_device_list" => decode_device_list(data),
        "device_list_chain" => device_list_chain(data),
        "decode_account_header" => decode_account_header(data),
        "decode_pairing_message" => decode_pairing_message(data),
        "decode_pairing_offer" => decode_pairing_offer(data),
        "sealed" => sealed(data),
        _ => panic!("unknown fuzz target {name}"),
    }
}

/// Prekey messages to Bob's fixture store: one per bundle, plus a later
/// message of the first session.
fn prekey_messages() -> Vec<(&'static str, Vec<u8>)> {
    let dir = directory();
    let mut rng = TestRng::new(0x5EED);
    let mut out = Vec::new();
    for (name, bundle) in [
        ("prekey-opk", &dir.with_opk),
        ("prekey-no-opk", &dir.without_opk),
        ("prekey-retained-spk", &dir.retained),
    ] {
        let mut s = Session::initiate(&mut rng, alice(), bundle, SessionConfig::default())
            .expect("initiate");
        out.push((name, s.encrypt(&mut rng, b"hello Bob").expect("encrypt")));
        if name == "prekey-opk" {
            let _ = s.encrypt(&mut rng, b"lost").expect("encrypt");
            out.push((
                "prekey-opk-n2",
                s.encrypt(&mut rng, &[0x42; 100]).expect("encrypt"),
            ));
        }
    }
    out
}

/// The seed corpus of every target: (target, file name, bytes). Every file
/// is well under 8 KiB.
pub fn seed_corpus() -> Vec<(&'static str, String, Vec<u8>)> {
    let dir = directory();
    let fx = session_fixture();
    let mut out: Vec<(&'static str, String, Vec<u8>)> = Vec::new();
    let mut add = |target: &'static str, name: &str, bytes: Vec<u8>| {
        assert!(bytes.len() < 8192, "{target}/{name} too large");
        out.push((target, name.to_string(), bytes));
    };

    // Edge inputs shared by the byte-level targets.
    let edges: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("version-only", vec![0x01]),
        ("unknown-version", vec![0x02; 64]),
        ("message-min", {
            let mut m = vec![0x01, 0x02];
            m.resize(2 + 40 + TAG_LEN, 0);
            m
        }),
        ("message-short-by-one", {
            let mut m = vec![0x01, 0x02];
            m.resize(2 + 40 + TAG_LEN - 1, 0);
            m
        }),
        ("unknown-kind", {
            let mut m = vec![0x01, 0x03];
            m.resize(200, 0);
            m
        }),
    ];

    // sealed: every envelope of the v2 pair, as id || payload.
    let sfx = sealed_fixture();
    for (i, (id, payload)) in sfx.sent.iter().chain(&sfx.undelivered).enumerate() {
        let kind = if payload.get(1) == Some(&0x01) {
            "prekey"
        } else {
            "chain"
        };
        add(
            "sealed",
            &format!("envelope-{i:02}-{kind}"),
            [&id[..], payload].concat(),
        );
    }

    // decode_incoming and decrypt_session: real messages and edges.
    for (i, (to_bob, m)) in fx.sent.iter().chain(&fx.undelivered).enumerate() {
        let who = if *to_bob { "to-bob" } else { "to-alice" };
        add("decode_incoming", &format!("msg-{i:02}-{who}"), m.clone());
        add("decrypt_session", &format!("msg-{i:02}-{who}"), m.clone());
    }
    for (name, m) in prekey_messages() {
        add("decode_incoming", name, m.clone());
        add("accept_prekey", name, m);
    }
    for (name, m) in &edges {
        add("decode_incoming", name, m.clone());
        add("decrypt_session", name, m.clone());
        add("accept_prekey", name, m.clone());
    }
    add(
        "accept_prekey",
        "normal-message",
        fx.undelivered[0].1.clone(),
    );

    // decode_bundle.
    add("decode_bundle", "with-opk", dir.with_opk.encode());
    add("decode_bundle", "without-opk", dir.without_opk.encode());
    add("decode_bundle", "retained-spk", dir.retained.encode());
    let mut rng = TestRng::new(0xB4D);
    let stale = cubbyhole::SignedPrekey::generate(&mut rng, &dir.bob, 9, NOW - 31 * 86_400)
        .expect("time in unix seconds");
    add(
        "decode_bundle",
        "stale",
        PrekeyBundle::new(&dir.bob, &stale, None).encode(),
    );
    let future = cubbyhole::SignedPrekey::generate(&mut rng, &dir.bob, 10, NOW + 86_400)
        .expect("time in unix seconds");
    add(
        "decode_bundle",
        "future",
        PrekeyBundle::new(&dir.bob, &future, None).encode(),
    );
    let mut bad_sig = dir.with_opk.encode();
    bad_sig[100] ^= 1;
    add("decode_bundle", "bad-signature", bad_sig);
    let mut trailing = dir.without_opk.encode();
    trailing.push(0);
    add("decode_bundle", "trailing-byte", trailing);
    for (name, m) in &edges[..3] {
        add("decode_bundle", name, m.clone());
    }

    // decode_state: every kind of session state the fixtures have.
    add("decode_state", "bob", fx.bob.to_bytes().to_vec());
    add("decode_state", "alice", fx.alice.to_bytes().to_vec());
    let mut rng = TestRng::new(0x57A7E);
    let fresh = Session::initiate(&mut rng, alice(), &dir.with_opk, SessionConfig::default())
        .expect("initiate");
    add(
        "decode_state",
        "initiator-pending-opk",
        fresh.to_bytes().to_vec(),
    );
    let fresh = Session::initiate(
        &mut rng,
        alice(),
        &dir.without_opk,
        SessionConfig {
            max_skip: 3,
            max_skipped_keys: 5,
        },
    )
    .expect("initiate");
    add(
        "decode_state",
        "initiator-pending-small-limits",
        fresh.to_bytes().to_vec(),
    );
    let mut truncated = fx.bob.to_bytes().to_vec();
    truncated.pop();
    add("decode_state", "bob-truncated", truncated);
    for (name, m) in &edges[..3] {
        add("decode_state", name, m.clone());
    }

    // decode_record: records of the fixture sessions, and a bare state.
    let record = {
        let mut r = SessionRecord::single(SessionEntry::new(fx.bob.clone(), 1_900_000_000, NOW));
        let mut other = SessionEntry::new(fresh.clone(), 1_900_000_001, NOW);
        other.superseded = true;
        other.reset = true;
        other.last_received = NOW;
        let alice_address = cubbyhole::transport::DeviceAddress::new(alice().public(), 1);
        let bob_address = cubbyhole::transport::DeviceAddress::new(directory().bob.public(), 1);
        r.insert(other, 40, &alice_address, &bob_address);
        r
    };
    add("decode_record", "two", record.to_bytes().to_vec());
    add(
        "decode_record",
        "one",
        SessionRecord::single(SessionEntry::new(fx.alice.clone(), 7, NOW))
            .to_bytes()
            .to_vec(),
    );
    add("decode_record", "legacy", fx.bob.to_bytes().to_vec());
    let mut cut = record.to_bytes().to_vec();
    cut.truncate(cut.len() - 3);
    add("decode_record", "truncated", cut);
    add("decode_record", "empty-record", vec![0x80, 0, 0]);

    // decode_frame: one of each kind, and broken ones.
    let frames = [
        (
            "message",
            Frame {
                device_id: 1,
                message: Some((Some([1; 16]), b"hello".to_vec())),
                ..Frame::default()
            },
        ),
        (
            "first",
            Frame {
                device_id: 2,
                generation: Some(1_900_000_000),
                reset: true,
                message: Some((Some([2; 16]), b"first".to_vec())),
                ..Frame::default()
            },
        ),
        (
            "receipts",
            Frame {
                device_id: 3,
                receipts: vec![[3; 16], [4; 16]],
                ..Frame::default()
            },
        ),
        (
            "notice",
            Frame {
                device_id: 4,
                generation: Some(5),
                dead: vec![[5; 16]],
                ..Frame::default()
            },
        ),
    ];
    for (name, frame) in &frames {
        add("decode_frame", name, frame.encode());
    }
    add("decode_frame", "v1", b"\x01\x00\x00\x00\x01body".to_vec());
    add(
        "decode_frame",
        "zero-count",
        vec![2, 0, 0, 0, 1, 0x08, 0, 0],
    );

    // two_party: hand-written scripts (see parse_two_party).
    let scripts: [(&str, &[u8]); 9] = [
        ("empty", &[]),
        // A sends 3, all delivered in reverse, B replies, A replies.
        (
            "ping-pong",
            &[
                1, 0, 5, 0, 7, 0, 9, 3, 2, 3, 1, 3, 0, 2, 4, 3, 0, 0, 3, 3, 0,
            ],
        ),
        // Small limits (max_skip 2, 4 keys), loss, replays and tampering.
        (
            "small-limits",
            &[
                0b1000_1011,
                0,
                1,
                0,
                2,
                0,
                3,
                0,
                4,
                6,
                1,
                3,
                2,
                2,
                5,
                3,
                0,
                7,
                0,
                8,
                0,
                1,
                2,
                0,
                0,
                9,
                3,
                0,
                7,
                1,
                8,
                1,
                0x10,
                0x00,
                3,
                0,
                137,
            ],
        ),
        // No one-time prekey; restore both sides between every step.
        (
            "restore",
            &[
                0, 0, 1, 9, 3, 0, 137, 2, 4, 9, 3, 0, 0, 9, 3, 0, 137, 7, 0, 7, 1,
            ],
        ),
        // Tamper with every kind of corruption.
        (
            "tamper",
            &[
                1, 0, 20, 8, 0, 0, 0, 8, 0, 0, 1, 8, 0, 0, 2, 8, 0, 0, 3, 8, 0, 0x40, 0x02, 3, 0,
                2, 10, 8, 1, 0x01, 0x01, 8, 1, 0xff, 0xff, 3, 0,
            ],
        ),
        // Many messages in flight, delivered out of order.
        (
            "burst",
            &[
                1, 0, 1, 0, 2, 0, 3, 0, 4, 0, 5, 0, 6, 0, 7, 0, 8, 3, 5, 3, 2, 3, 0, 3, 3, 2, 9, 2,
                9, 3, 1, 3, 0, 0, 9, 3, 0, 3, 0, 3, 0, 3, 0,
            ],
        ),
        // Bob rotates his signed prekey and drops the oldest retained one
        // before Alice's first message arrives (hers is still retained),
        // then restores his store and generates more one-time prekeys.
        (
            "prekeys-rotate",
            &[
                1, 0, 5, 69, 0, 69, 7, 3, 0, 2, 4, 3, 0, 69, 4, 69, 6, 0, 7, 3, 0, 69, 2, 0, 3, 3,
                0,
            ],
        ),
        // Bob withdraws the one-time prekey Alice's bundle named, then
        // rotates and forgets the signed prekey: her prekey messages are
        // unknown_prekey, every time.
        (
            "prekeys-withdrawn",
            &[
                1, 0, 3, 0, 4, 69, 13, 3, 0, 7, 1, 69, 0, 69, 2, 3, 0, 7, 0, 69, 4,
            ],
        ),
        // No one-time prekey; prekey operations between every step.
        (
            "prekeys-interleaved",
            &[
                0, 0, 1, 69, 4, 3, 0, 69, 0, 2, 8, 69, 16, 3, 0, 69, 4, 69, 2, 0, 9, 3, 0, 69, 38,
                69, 4, 9, 137, 3, 0, 69, 1,
            ],
        ),
    ];
    for (name, script) in scripts {
        add("two_party", name, script.to_vec());
    }

    stored_record_seeds(&mut add);
    relay_seeds(&mut add);
    account_seeds(&mut add);
    out
}

/// Seeds of the stored-record targets.
fn stored_record_seeds(add: &mut impl FnMut(&'static str, &str, Vec<u8>)) {
    let dir = directory();
    let mut rng = TestRng::new(0x5702E);

    // decode_prekeys: the fixture store, a bare one, one about to wrap its
    // one-time ids, and malformed variants.
    let store = dir.store.to_bytes().to_vec();
    add("decode_prekeys", "fixture", store.clone());
    let bare = PrekeyStore::new(&mut rng, &dir.bob, NOW).expect("time in unix seconds");
    add("decode_prekeys", "bare", bare.to_bytes().to_vec());
    let mut high = PrekeyStore::new(&mut rng, &dir.bob, NOW).expect("time in unix seconds");
    high.insert_one_time_prekey(cubbyhole::OneTimePrekey::from_secret(u32::MAX - 1, [7; 32]));
    add("decode_prekeys", "next-id-max", high.to_bytes().to_vec());
    let mut truncated = store.clone();
    truncated.pop();
    add("decode_prekeys", "truncated", truncated);
    let mut trailing = store.clone();
    trailing.push(0);
    add("decode_prekeys", "trailing-byte", trailing);
    // One-time prekeys 1, 2, 3 start after the signed ones: swap 1 and 2.
    let one_time_start = store.len() - 3 * 68;
    let mut unsorted = store.clone();
    unsorted[one_time_start..one_time_start + 136].rotate_left(68);
    add("decode_prekeys", "one-time-unsorted", unsorted);
    let mut repeated = store.clone();
    repeated.copy_within(one_time_start..one_time_start + 68, one_time_start + 68);
    add("decode_prekeys", "one-time-repeated", repeated);
    let mut no_signed = store.clone();
    no_signed[5..9].copy_from_slice(&0u32.to_be_bytes());
    add("decode_prekeys", "no-signed-prekey", no_signed);
    let mut huge_count = store.clone();
    huge_count[5..9].copy_from_slice(&u32::MAX.to_be_bytes());
    add("decode_prekeys", "huge-signed-count", huge_count);
    add("decode_prekeys", "empty", Vec::new());

    // decode_prekey_state.
    let state = PrekeyState {
        prekeys: dir.store.clone(),
        upload_counter: 7,
        last_rotation: NOW - 3_600,
        retired_at: vec![(1, NOW - 3_600)],
        one_time_retired: vec![(1, NOW - 60)],
        upload_pending: true,
        accepted: Vec::new(),
    };
    let state_bytes = state.to_bytes().to_vec();
    add("decode_prekey_state", "fixture", state_bytes.clone());
    let fresh = PrekeyState {
        prekeys: bare,
        upload_counter: 0,
        last_rotation: NOW,
        retired_at: Vec::new(),
        one_time_retired: Vec::new(),
        upload_pending: false,
        accepted: Vec::new(),
    };
    add("decode_prekey_state", "fresh", fresh.to_bytes().to_vec());
    let mut bad_flag = state_bytes.clone();
    bad_flag[17] = 2;
    add("decode_prekey_state", "bad-pending-flag", bad_flag);
    let mut huge_list = state_bytes.clone();
    huge_list[18..22].copy_from_slice(&u32::MAX.to_be_bytes());
    add("decode_prekey_state", "huge-list-count", huge_list);
    let mut old_version = state_bytes.clone();
    old_version[0] = 1;
    add("decode_prekey_state", "version-1", old_version);
    let mut truncated = state_bytes;
    truncated.pop();
    add("decode_prekey_state", "truncated", truncated);
    add("decode_prekey_state", "empty", Vec::new());

    // decode_identity.
    for (name, seed, device) in [("alice", ALICE_SEED, 1u32), ("bob", BOB_SEED, u32::MAX)] {
        let identity = LocalIdentity {
            keys: IdentityKeyPair::from_seed(&seed),
            device_id: device,
        };
        add("decode_identity", name, identity.to_bytes().to_vec());
    }
    add("decode_identity", "short", vec![0xA1; 35]);
    add("decode_identity", "long", vec![0xA1; 37]);
    add("decode_identity", "empty", Vec::new());
}

/// Seeds of the relay-format targets.
fn relay_seeds(add: &mut impl FnMut(&'static str, &str, Vec<u8>)) {
    let dir = directory();
    let fx = relay_fixture();

    // decode_upload: raw uploads (version byte first) and structured ones
    // (0x00 first: fields for `signed_upload`).
    add("decode_upload", "fixture", fx.upload.clone());
    let bare = BundleSetUpload::new(
        7,
        &dir.bob,
        2,
        dir.store.current_signed_prekey(),
        &[],
        false,
    )
    .sign(&dir.bob);
    add("decode_upload", "no-one-time-prekeys", bare);
    let mut bad_signature = fx.upload.clone();
    let last = bad_signature.len() - 1;
    bad_signature[last] ^= 1;
    add("decode_upload", "bad-signature", bad_signature);
    let mut bad_spk = fx.upload.clone();
    bad_spk[100] ^= 1;
    add("decode_upload", "bad-signed-prekey", bad_spk);
    let mut truncated = fx.upload.clone();
    truncated.pop();
    add("decode_upload", "truncated", truncated);
    let mut count_overrun = fx.upload.clone();
    count_overrun[154..156].copy_from_slice(&u16::MAX.to_be_bytes());
    add("decode_upload", "count-overrun", count_overrun);
    let structured = |counter: u64, flags: u8, one_time: &[(u32, u8)]| {
        let mut b = vec![0x00];
        b.extend_from_slice(&counter.to_be_bytes());
        b.extend_from_slice(&5u32.to_be_bytes());
        b.extend_from_slice(&(NOW - 60).to_be_bytes());
        b.push(flags);
        for (id, key) in one_time {
            b.extend_from_slice(&id.to_be_bytes());
            b.push(*key);
        }
        b
    };
    add(
        "decode_upload",
        "structured-extend",
        structured(2, 0, &[(3, 9), (4, 10)]),
    );
    add(
        "decode_upload",
        "structured-replace",
        structured(9, 1, &[(8, 1)]),
    );
    add(
        "decode_upload",
        "structured-replayed",
        structured(1, 0, &[(5, 5)]),
    );
    add(
        "decode_upload",
        "structured-duplicate-ids",
        structured(3, 0, &[(6, 1), (6, 2)]),
    );

    // decode_mailbox_auth.
    add("decode_mailbox_auth", "fetch", fx.fetch_auth.encode());
    let acknowledge = MailboxAuth::sign(
        &dir.bob,
        BOB_DEVICE_ID,
        MailboxOp::Acknowledge,
        fx.challenges[1],
    );
    add("decode_mailbox_auth", "acknowledge", acknowledge.encode());
    let unknown = MailboxAuth::sign(&dir.bob, BOB_DEVICE_ID, MailboxOp::Fetch, [0x77; 32]);
    add("decode_mailbox_auth", "unknown-challenge", unknown.encode());
    let stranger = MailboxAuth::sign(alice(), 1, MailboxOp::Fetch, fx.challenges[0]);
    add("decode_mailbox_auth", "stranger", stranger.encode());
    let mut bad_op = fx.fetch_auth.encode();
    bad_op[36] = 3;
    add("decode_mailbox_auth", "bad-op", bad_op);
    let mut swapped_op = fx.fetch_auth.encode();
    swapped_op[36] = 2;
    add("decode_mailbox_auth", "swapped-op", swapped_op);
    let mut truncated = fx.fetch_auth.encode();
    truncated.pop();
    add("decode_mailbox_auth", "truncated", truncated);

    // decode_envelope.
    for e in &fx.envelopes[..2] {
        add(
            "decode_envelope",
            &format!("pending-{}", e.id.0[0]),
            encode_envelope(e),
        );
    }
    let message = Envelope {
        id: EnvelopeId([0x42; 16]),
        payload: fixture_prekey_message().to_vec(),
    };
    add(
        "decode_envelope",
        "prekey-message",
        encode_envelope(&message),
    );
    let empty = Envelope {
        id: EnvelopeId([0x43; 16]),
        payload: Vec::new(),
    };
    add("decode_envelope", "empty-payload", encode_envelope(&empty));
    let mut bad_version = encode_envelope(&empty);
    bad_version[0] = 2;
    add("decode_envelope", "bad-version", bad_version);
    add("decode_envelope", "short-id", vec![1; 16]);

    // decode_envelope_list.
    let all = encode_envelope_list(&fx.envelopes);
    add("decode_envelope_list", "pending", all.clone());
    add(
        "decode_envelope_list",
        "one",
        encode_envelope_list(&[message, empty]),
    );
    add("decode_envelope_list", "none", Vec::new());
    let mut truncated = all.clone();
    truncated.pop();
    add("decode_envelope_list", "truncated", truncated);
    let mut overrun = all.clone();
    overrun[..4].copy_from_slice(&u32::MAX.to_be_bytes());
    add("decode_envelope_list", "length-overrun", overrun);
    add("decode_envelope_list", "zero-length", vec![0; 4]);
    add("decode_envelope_list", "short-length", vec![0; 3]);

    // decode_acknowledge.
    let ids: Vec<EnvelopeId> = fx.envelopes.iter().map(|e| e.id).collect();
    let body =
        |auth: &MailboxAuth, ids: &[EnvelopeId]| encode_acknowledge(auth, ids).expect("few ids");
    add("decode_acknowledge", "two", body(&acknowledge, &ids[..2]));
    add(
        "decode_acknowledge",
        "unknown-and-repeated",
        body(&acknowledge, &[ids[0], EnvelopeId([9; 16]), ids[0]]),
    );
    add("decode_acknowledge", "none", body(&acknowledge, &[]));
    add(
        "decode_acknowledge",
        "fetch-proof",
        body(&fx.fetch_auth, &ids),
    );
    let mut count_mismatch = body(&acknowledge, &ids);
    count_mismatch[MAILBOX_AUTH_LEN + 1] = 2;
    add("decode_acknowledge", "count-mismatch", count_mismatch);
    let mut bad_op = body(&acknowledge, &ids[..1]);
    bad_op[36] = 0;
    add("decode_acknowledge", "bad-op", bad_op);
    add("decode_acknowledge", "proof-only", acknowledge.encode());

    // decode_fetch_query.
    let queries: [(&str, &[u8]); 12] = [
        ("default", b""),
        ("limit", b"limit=100"),
        ("limit-wait", b"limit=7&wait_ms=30000"),
        ("mixed", b"wait_ms=5&limit=7&x=y&&"),
        ("repeated", b"limit=1&limit=0000000042"),
        ("empty-value", b"limit="),
        ("no-equals", b"wait_ms"),
        ("negative", b"wait_ms=-1"),
        ("overflow", b"limit=4294967296"),
        ("plus", b"limit=+1"),
        ("eleven-digits", b"limit=00000000001"),
        ("not-utf8", b"limit=\xff"),
    ];
    for (name, query) in queries {
        add("decode_fetch_query", name, query.to_vec());
    }
}

/// Seeds of the account targets (issue 15).
fn account_seeds(add: &mut impl FnMut(&'static str, &str, Vec<u8>)) {
    let fx = device_list_fixture();
    let keys = device_keys();
    let (account, v1_hash, v2_hash) = (fx.account, *fx.v1.body_hash(), *fx.v2.body_hash());

    // decode_device_list: valid lists of every verdict, and malformed ones.
    let v3 = build_device_list(account, 3, v2_hash, &[(1, 2), (3, 4)], &[1, 3]);
    let all: Vec<(usize, u32)> = (0..MAX_DEVICES).map(|i| (i, i as u32 + 1)).collect();
    let lists = [
        ("genesis", fx.v1.list().clone()),
        ("add-device", fx.v2.list().clone()),
        ("remove-founder-add", v3.clone()),
        (
            "sixteen-devices",
            build_device_list(
                account,
                3,
                v2_hash,
                &all,
                &(1..MAX_DEVICES).collect::<Vec<_>>(),
            ),
        ),
        (
            "conflicting-sibling",
            build_device_list(account, 2, v1_hash, &[(0, 1), (2, 3)], &[0, 2]),
        ),
        ("other-account-genesis", DeviceList::genesis(&keys[2], 3)),
        (
            "gap",
            build_device_list(account, 4, [7; 32], &[(0, 1)], &[0]),
        ),
        (
            "device-id-reused",
            build_device_list(account, 3, v2_hash, &[(0, 1), (4, 2)], &[0, 4]),
        ),
        (
            "device-id-changed",
            build_device_list(account, 3, v2_hash, &[(0, 1), (1, 5)], &[0]),
        ),
        (
            "added-unsigned",
            build_device_list(account, 3, v2_hash, &[(0, 1), (1, 2), (5, 6)], &[0]),
        ),
    ];
    for (name, list) in &lists {
        add("decode_device_list", name, list.encode());
    }
    let mut bad_signature = v3.encode();
    let last = bad_signature.len() - 1;
    bad_signature[last] ^= 1;
    add("decode_device_list", "bad-signature", bad_signature);
    let v1 = fx.v1.encode();
    let v2 = fx.v2.encode();
    add("decode_device_list", "empty", Vec::new());
    add(
        "decode_device_list",
        "truncated",
        v2[..v2.len() - 1].to_vec(),
    );
    let mut trailing = v2.clone();
    trailing.push(0);
    add("decode_device_list", "trailing-byte", trailing);
    let mut zero_count = v1.clone();
    zero_count[73] = 0;
    add("decode_device_list", "zero-count", zero_count);
    let mut unsorted = v2.clone();
    unsorted[74..146].rotate_left(36);
    add("decode_device_list", "keys-unsorted", unsorted);
    let mut version_zero = v1.clone();
    version_zero[33..41].fill(0);
    add("decode_device_list", "version-zero", version_zero);
    let mut bad_index = v1.clone();
    bad_index[74 + 36 + 1] = 1;
    add(
        "decode_device_list",
        "signature-index-out-of-range",
        bad_index,
    );

    // device_list_chain: scripts of six bytes a list (see chain_lists).
    let scripts: [(&str, &[u8]); 9] = [
        ("empty", &[]),
        ("add-device", &[3, 0, 7, 0, 5, 0]),
        (
            "chain-of-three",
            &[3, 0, 7, 0, 5, 0, 4, 0, 6, 0, 2, 0, 5, 0, 0x0e, 0, 0x0a, 0],
        ),
        ("conflict", &[3, 0, 7, 0, 5, 0, 0x33, 0, 0x0b, 0, 0x09, 0]),
        ("sixteen", &[3, 0xff, 0xff, 0xff, 0xfe, 0]),
        (
            "other-account",
            &[0x29, 0, 4, 0, 4, 0, 0x0a, 0, 0x24, 0, 0x24, 0],
        ),
        (
            "renumbered-and-corrupted",
            &[0x83, 0, 3, 0, 1, 0x41, 0x43, 0, 7, 0, 5, 0],
        ),
        // v3, then the same body under v2's hash with a broken signature.
        (
            "same-body-bad-copy",
            &[3, 0, 7, 0, 5, 0, 0x73, 0, 7, 0, 5, 0],
        ),
        (
            "builder-refusals",
            &[
                0, 0, 1, 0, 1, 0, 3, 0, 0, 0, 0, 0, 3, 0, 3, 0, 0, 0, 0x83, 0, 3, 0, 3, 0x10,
            ],
        ),
    ];
    for (name, script) in scripts {
        add("device_list_chain", name, script.to_vec());
    }

    // decode_account_header: kinds 1 and 2, with and without previous.
    let headers = [
        ("to-account", false, None, &b"hello"[..]),
        ("to-account-previous", false, Some([0x22; 16]), &b""[..]),
        ("sent-copy", true, None, &b"\x02\x00\x00\x00\x01"[..]),
        ("sent-copy-previous", true, Some([0xff; 16]), &b"body"[..]),
    ];
    let to_account = AccountHeader {
        sent_copy: false,
        message: MessageId([0x11; 16]),
        to: account,
        previous: None,
    };
    for (name, sent_copy, previous, body) in headers {
        let header = AccountHeader {
            sent_copy,
            previous: previous.map(MessageId),
            ..to_account
        };
        add("decode_account_header", name, header.encode(body));
    }
    let valid = to_account.encode(b"");
    add(
        "decode_account_header",
        "short-by-one",
        valid[..ACCOUNT_HEADER_LEN - 1].to_vec(),
    );
    let mut bad_magic = valid.clone();
    bad_magic[0] = b'x';
    add("decode_account_header", "bad-magic", bad_magic);
    for kind in [0u8, 3] {
        let mut other = valid.clone();
        other[8] = kind;
        add("decode_account_header", &format!("kind-{kind}"), other);
    }
    add("decode_account_header", "empty", Vec::new());

    // decode_pairing_offer.
    let payload = |identity: &[u8; 32], device_id: u32| {
        let mut p = vec![0x01];
        p.extend_from_slice(identity);
        p.extend_from_slice(&device_id.to_be_bytes());
        p.extend_from_slice(&[0x44; 16]);
        p
    };
    let offer = payload(keys[2].public().as_bytes(), 3);
    add("decode_pairing_offer", "offer", offer.clone());
    add(
        "decode_pairing_offer",
        "device-max",
        payload(keys[3].public().as_bytes(), u32::MAX),
    );
    add("decode_pairing_offer", "short", offer[..52].to_vec());
    let mut long = offer.clone();
    long.push(0);
    add("decode_pairing_offer", "long", long);
    let mut format = offer.clone();
    format[0] = 2;
    add("decode_pairing_offer", "format-2", format);
    add("decode_pairing_offer", "bad-key", payload(&[0xff; 32], 3));
    add("decode_pairing_offer", "empty", Vec::new());

    // decode_pairing_message: key 0 adds key 2 (the offer's device).
    let code = PairingOffer::decode(&offer).expect("the offer").code;
    let list = build_device_list(account, 3, v2_hash, &[(0, 1), (1, 2), (2, 3)], &[0]);
    let contact = |n: u8, trust| PairingContact {
        account: AccountId([n; 32]),
        trust,
        version: u64::from(n),
        head_hash: [n ^ 0xff; 32],
    };
    let message = |contacts| PairingMessage {
        message: MessageId([0x33; 16]),
        code: code.clone(),
        list: list.clone(),
        contacts,
    };
    let none = message(Vec::new()).encode().to_vec();
    add("decode_pairing_message", "no-contacts", none.clone());
    let contacts = vec![
        contact(1, Trust::Unvalidated),
        contact(2, Trust::Validated),
        contact(3, Trust::Compromised),
    ];
    let three = message(contacts).encode().to_vec();
    add("decode_pairing_message", "three-contacts", three.clone());
    let mut trailing = three.clone();
    trailing.push(0);
    add("decode_pairing_message", "trailing-byte", trailing);
    let mut mismatch = none.clone();
    mismatch[25] ^= 1;
    add("decode_pairing_message", "account-mismatch", mismatch);
    let mut bad_trust = three.clone();
    bad_trust[none.len() + 32] = 3;
    add("decode_pairing_message", "bad-trust", bad_trust);
    let count_at = none.len() - 2;
    let mut counted = none.clone();
    counted[count_at..].copy_from_slice(&(MAX_PAIRING_CONTACTS as u16).to_be_bytes());
    add("decode_pairing_message", "count-without-contacts", counted);
    let mut too_many = none.clone();
    too_many[count_at..].copy_from_slice(&(MAX_PAIRING_CONTACTS as u16 + 1).to_be_bytes());
    add("decode_pairing_message", "too-many-contacts", too_many);
    let mut list_overrun = none.clone();
    list_overrun[73..75].copy_from_slice(&u16::MAX.to_be_bytes());
    add(
        "decode_pairing_message",
        "list-length-overrun",
        list_overrun,
    );
    let mut kind_1 = none;
    kind_1[8] = 1;
    add("decode_pairing_message", "account-message", kind_1);
}
