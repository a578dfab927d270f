//! The bodies of cubbyhole's fuzz targets, as plain functions.
//!
//! This file depends on nothing but `cubbyhole`, `rand_core` (the crate's own
//! RNG traits) and `std`, so that it compiles both inside the cargo-fuzz crate
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

use std::collections::VecDeque;
use std::sync::OnceLock;

use cubbyhole::bundle::{BUNDLE_LEN_WITHOUT_OPK, BUNDLE_LEN_WITH_OPK};
use cubbyhole::{
    Error, FreshnessPolicy, Header, IdentityKey, IdentityKeyPair, Incoming, PrekeyBundle,
    PrekeyLookup, PrekeyStore, Role, Session, SessionConfig, VerifiedBundle,
};
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
// decode_incoming
// ---------------------------------------------------------------------------

/// `Incoming::decode` on arbitrary bytes: only `Decode` or (prekey messages)
/// `InvalidKey` errors; on success the accessors re-encode to exactly the
/// input's prefix, and a tag fits after it.
pub fn decode_incoming(data: &[u8]) {
    // Decoding checks the structure only (IK_A is validated by accept).
    let message = match Incoming::decode(data) {
        Ok(m) => m,
        Err(Error::Decode(_)) => return,
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
}

// ---------------------------------------------------------------------------
// decode_bundle
// ---------------------------------------------------------------------------

/// `PrekeyBundle::decode`: the encoding is canonical (re-encodes to the
/// input), `verify` at a fixed time gives exactly the profile's outcome, and
/// a session can be initiated (or refused with `InvalidKey`) from any bundle
/// that verifies.
pub fn decode_bundle(data: &[u8]) {
    let bundle = match PrekeyBundle::decode(data) {
        Ok(b) => b,
        Err(Error::Decode(_) | Error::InvalidKey) => return,
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
pub fn decode_state(data: &[u8]) {
    let mut session = match Session::from_bytes(data) {
        Ok(s) => s,
        Err(Error::State(_)) => return,
        Err(e) => panic!("Session::from_bytes returned {e:?}"),
    };
    let before = session.to_bytes();
    assert!(same(&before, data), "state encoding is not canonical");
    assert!(session.skipped_message_keys() <= session.config().max_skipped_keys as usize);
    if session.sends_prekey_messages() {
        assert_eq!(session.role(), Role::Initiator);
    }
    let _ = (
        session.local_identity(),
        session.remote_identity(),
        session.ephemeral_key(),
    );

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
                assert_eq!(&f.ephemeral, session.ephemeral_key());
            }
            let after = session.to_bytes();
            let restored = Session::from_bytes(&after).expect("state after encrypt restores");
            assert!(same(&restored.to_bytes(), &after));
        }
        Err(_) => assert!(
            same(&session.to_bytes(), data),
            "failed encrypt changed the state"
        ),
    }
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
        let mut store = PrekeyStore::new(&mut rng, &bob, NOW - 86_400);
        let old = store.current_signed_prekey().clone();
        store.rotate_signed_prekey(&mut rng, &bob, NOW - 3_600);
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
pub fn decrypt_session(data: &[u8]) {
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
                let restored = Session::from_bytes(&after).expect("state after decrypt restores");
                assert!(same(&restored.to_bytes(), &after));
                assert!(session.decrypt(data).is_err(), "message decrypted twice");
                assert!(
                    same(&session.to_bytes(), &after),
                    "rejected replay changed the state"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// accept_prekey
// ---------------------------------------------------------------------------

/// Arbitrary bytes to the responder's accept path with a fixed store: the
/// profile's order of checks on prekey ids, no consumption on failure,
/// exactly the named one-time prekey consumed on success.
pub fn accept_prekey(data: &[u8]) {
    let dir = directory();
    let Ok(incoming) = Incoming::decode(data) else {
        return;
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
        return;
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
            assert_eq!(session.ephemeral_key(), &fields.ephemeral);
            assert!(session.matches(&incoming));
            let after = session.to_bytes();
            let restored = Session::from_bytes(&after).expect("accepted session restores");
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
}

/// Most operations a script runs.
pub const MAX_OPS: usize = 160;
/// Most messages a script sends.
pub const MAX_MESSAGES: usize = 64;

/// Parses fuzzer bytes: first byte the configuration (bit 0: bundle with a
/// one-time prekey; bit 1: small limits, with `max_skip = bits 2..5` and
/// `max_skipped_keys = 2 * bits 5..8`), then one operation per byte (with
/// its arguments in the following bytes).
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
pub fn two_party(data: &[u8]) {
    let (config, with_opk, ops) = parse_two_party(data);
    run_two_party(config, with_opk, &ops, false);
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

struct World {
    config: SessionConfig,
    with_opk: bool,
    rng: TestRng,
    alice: Session,
    bob: Option<Session>,
    store: PrekeyStore,
    initial_one_time_prekeys: usize,
    alice_model: ReceiverModel,
    bob_model: ReceiverModel,
    alice_heard_back: bool,
    sent: Vec<Sent>,
    in_flight: Vec<usize>,
}

type Snapshot = (Vec<u8>, Option<Vec<u8>>, usize);

impl World {
    fn snapshot(&self) -> Snapshot {
        (
            self.alice.to_bytes().to_vec(),
            self.bob.as_ref().map(|b| b.to_bytes().to_vec()),
            self.store.one_time_prekey_count(),
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
        let expected = model.expect(&msg.header, self.config);
        let before = self.snapshot();
        let got = self.deliver(msg.to_bob, &msg.bytes);
        if self.config == SessionConfig::default() && msg.deliveries == 0 {
            // Without eviction or skip limits in reach, every first delivery
            // of a genuine message succeeds, whatever the order.
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
                let restored = Session::from_bytes(&bytes).expect("state restores");
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
        let consumed = usize::from(self.bob.is_some() && self.with_opk);
        assert_eq!(
            self.store.one_time_prekey_count(),
            self.initial_one_time_prekeys - consumed
        );
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
        with_opk,
        rng,
        alice,
        bob: None,
        store: dir.store.clone(),
        initial_one_time_prekeys: dir.store.one_time_prekey_count(),
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
                world.alice = Session::from_bytes(&world.alice.to_bytes()).expect("restore");
            }
            Op::Restore { alice: false } => {
                if let Some(bob) = &world.bob {
                    world.bob = Some(Session::from_bytes(&bob.to_bytes()).expect("restore"));
                }
            }
            _ => {}
        }
        world.check(restore_every_step);
    }
    world.check(true);
}

// ---------------------------------------------------------------------------
// Seed corpora
// ---------------------------------------------------------------------------

/// The names of every target, as in `fuzz/fuzz_targets/`.
pub const TARGETS: [&str; 6] = [
    "decode_incoming",
    "decode_bundle",
    "decode_state",
    "decrypt_session",
    "accept_prekey",
    "two_party",
];

/// Runs the target called `name` on `data`.
pub fn run(name: &str, data: &[u8]) {
    match name {
        "decode_incoming" => decode_incoming(data),
        "decode_bundle" => decode_bundle(data),
        "decode_state" => decode_state(data),
        "decrypt_session" => decrypt_session(data),
        "accept_prekey" => accept_prekey(data),
        "two_party" => two_party(data),
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
    let stale = cubbyhole::SignedPrekey::generate(&mut rng, &dir.bob, 9, NOW - 31 * 86_400);
    add(
        "decode_bundle",
        "stale",
        PrekeyBundle::new(&dir.bob, &stale, None).encode(),
    );
    let future = cubbyhole::SignedPrekey::generate(&mut rng, &dir.bob, 10, NOW + 86_400);
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

    // two_party: hand-written scripts (see parse_two_party).
    let scripts: [(&str, &[u8]); 6] = [
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
    ];
    for (name, script) in scripts {
        add("two_party", name, script.to_vec());
    }
    out
}
