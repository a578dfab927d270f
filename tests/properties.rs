//! Property tests:
//!
//! - two parties over a relay that loses, duplicates, reorders and corrupts
//!   messages, under random scripts, with every outcome checked against the
//!   profile (the script runner and its receiver model are shared with the
//!   `two_party` fuzz target, in `fuzz/src/targets.rs`);
//! - tamper everything: every bit flip, truncation and an appended byte of a
//!   prekey message (new and repeated), a normal message and a bundle is
//!   rejected with the error kind the profile's order of checks determines,
//!   and leaves the receiver's state byte-identical;
//! - the decoders never panic on arbitrary bytes.

#[path = "../fuzz/src/targets.rs"]
#[allow(dead_code)]
mod targets;

use cubbyhole::{
    Error, FreshnessPolicy, IdentityKey, IdentityKeyPair, Incoming, PrekeyBundle, PrekeyLookup,
    PrekeyStore, Session, SessionConfig,
};
use proptest::collection::vec;
use proptest::prelude::*;
use targets::{directory, run_two_party, Op, TestRng, ALICE_SEED, NOW};

const MAX_SKIP: u64 = SessionConfig::DEFAULT_MAX_SKIP as u64;

// ---------------------------------------------------------------------------
// Two parties over a bad relay
// ---------------------------------------------------------------------------

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (any::<bool>(), any::<u8>()).prop_map(|(alice, len)| Op::Send { alice, len }),
        5 => any::<u8>().prop_map(Op::Deliver),
        1 => any::<u8>().prop_map(Op::Drop),
        2 => any::<u8>().prop_map(Op::Replay),
        1 => (any::<u8>(), any::<u16>()).prop_map(|(index, how)| Op::Tamper { index, how }),
        1 => any::<bool>().prop_map(|alice| Op::Restore { alice }),
        1 => any::<u8>().prop_map(Op::Prekeys),
    ]
}

fn config() -> impl Strategy<Value = SessionConfig> {
    prop_oneof![
        Just(SessionConfig::default()),
        (0u32..6, 0u32..12).prop_map(|(max_skip, max_skipped_keys)| SessionConfig {
            max_skip,
            max_skipped_keys,
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 32,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Random interleavings of sends, deliveries, losses, replays,
    /// corruptions and restarts. After every step (see
    /// `targets::run_two_party`): a genuine message decrypts to its
    /// plaintext at most once, and otherwise fails exactly as the profile
    /// says (`duplicate` while the receiver still has the key's chain,
    /// `auth` once the chain was abandoned, `too_many_skipped` beyond the
    /// limits); with the default limits every first delivery succeeds; a
    /// corrupted message is rejected; a rejection changes nothing; and both
    /// sessions restore from `to_bytes` to sessions that re-encode to the
    /// same bytes (and, when the script restores them, carry on
    /// identically).
    #[test]
    fn two_parties_over_a_lossy_relay(
        config in config(),
        with_opk in any::<bool>(),
        ops in vec(op(), 1..100),
    ) {
        run_two_party(config, with_opk, &ops, true);
    }

    /// In-order, lossless traffic with long runs in one direction: every
    /// message decrypts.
    #[test]
    fn long_chains_in_order(runs in vec((any::<bool>(), 1u8..12), 1..8)) {
        let mut ops = Vec::new();
        for (alice, len) in runs {
            for i in 0..len {
                ops.push(Op::Send { alice, len: i });
                ops.push(Op::Deliver(0));
            }
        }
        run_two_party(SessionConfig::default(), true, &ops, true);
    }
}

// ---------------------------------------------------------------------------
// Tamper everything
// ---------------------------------------------------------------------------

/// What a corruption did to the message.
#[derive(Clone, Copy, Debug)]
enum Variant {
    /// Bit `bit` of byte `byte` flipped.
    Flip { byte: usize, bit: u8 },
    /// Truncated to `len` bytes.
    Truncate { len: usize },
    /// One byte appended.
    Append,
}

/// Every single-bit flip, every truncation, and an appended byte.
fn variants(original: &[u8]) -> Vec<(Variant, Vec<u8>)> {
    let mut out = Vec::new();
    for byte in 0..original.len() {
        for bit in 0..8u8 {
            let mut m = original.to_vec();
            m[byte] ^= 1 << bit;
            out.push((Variant::Flip { byte, bit }, m));
        }
    }
    for len in 0..original.len() {
        out.push((Variant::Truncate { len }, original[..len].to_vec()));
    }
    let mut m = original.to_vec();
    m.push(0);
    out.push((Variant::Append, m));
    out
}

fn u32_at(m: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(m[at..at + 4].try_into().expect("4 bytes"))
}

/// Byte offsets of a prekey message's fields.
struct PrekeyLayout {
    has_opk: bool,
}

impl PrekeyLayout {
    const IK: usize = 2;
    const EK: usize = 34;
    const SPK: usize = 66;
    const HAS_OPK: usize = 70;
    const OPK: usize = 71;
    fn header(&self) -> usize {
        if self.has_opk {
            75
        } else {
            71
        }
    }
    fn prefix_len(&self) -> usize {
        self.header() + 40
    }
}

/// Bob as an application runs him: his prekey store and the session (at
/// most one here) keyed by (IK_A, EK_A).
#[derive(Clone)]
struct Bob {
    store: PrekeyStore,
    session: Option<Session>,
}

impl Bob {
    fn new() -> Self {
        Bob {
            store: directory().store.clone(),
            session: None,
        }
    }

    /// A prekey message goes to the session it names, else to the store; a
    /// normal message to the session.
    fn receive(&mut self, bytes: &[u8]) -> Result<Vec<u8>, Error> {
        let incoming = Incoming::decode(bytes)?;
        let mut out = Vec::new();
        match &mut self.session {
            Some(s) if s.matches(&incoming) => {
                s.decrypt_incoming(&incoming, &mut out)?;
                Ok(out)
            }
            _ if incoming.prekey().is_some() => {
                let accepted =
                    self.store
                        .accept(&directory().bob, &incoming, SessionConfig::default())?;
                assert!(self.session.is_none(), "accepted a second session");
                self.session = Some(accepted.session);
                Ok(accepted.plaintext)
            }
            _ => Err(Error::SessionMismatch),
        }
    }

    fn state(&self) -> (Option<Vec<u8>>, usize, Vec<bool>) {
        (
            self.session.as_ref().map(|s| s.to_bytes().to_vec()),
            self.store.one_time_prekey_count(),
            (0..8)
                .map(|id| self.store.one_time_prekey(id).is_some())
                .collect(),
        )
    }
}

fn alice() -> IdentityKeyPair {
    IdentityKeyPair::from_seed(&ALICE_SEED)
}

/// Expected outcome of a prekey message variant. `existing`: Bob already
/// has the session of the unaltered message (whose header is `n = nr`
/// of that session's current chain: `nr` given), and its one-time prekey,
/// if any, was consumed.
fn expect_prekey(
    original: &[u8],
    layout: &PrekeyLayout,
    variant: Variant,
    tampered: &[u8],
    store: &PrekeyStore,
    existing: Option<u32>,
) -> Result<(), Error> {
    let header = layout.header();
    let nr = u64::from(existing.unwrap_or(0));
    let byte = match variant {
        Variant::Truncate { len } if len < layout.prefix_len() + 16 => {
            return Err(Error::Decode("truncated"))
        }
        Variant::Truncate { .. } | Variant::Append => return Err(Error::Auth),
        Variant::Flip { byte, .. } => byte,
    };
    // A new session: IK_A valid, then the prekey ids held (profile order).
    let new_session = |ik: &[u8], spk: u32, opk: Option<u32>| -> Result<(), Error> {
        if IdentityKey::from_bytes(ik).is_err() {
            return Err(Error::InvalidKey);
        }
        if store.signed_prekey(spk).is_none() {
            return Err(Error::UnknownPrekey);
        }
        if opk.is_some_and(|id| store.one_time_prekey(id).is_none()) {
            return Err(Error::UnknownPrekey);
        }
        Err(Error::Auth)
    };
    let spk = u32_at(tampered, PrekeyLayout::SPK);
    let opk = layout.has_opk.then(|| u32_at(original, PrekeyLayout::OPK));
    match byte {
        0 | 1 => Err(Error::Decode("version or kind")),
        _ if byte < PrekeyLayout::SPK => {
            // IK_A or EK_A: no existing session matches any more.
            new_session(&tampered[PrekeyLayout::IK..PrekeyLayout::EK], spk, opk)
        }
        _ if byte < PrekeyLayout::HAS_OPK => match existing {
            Some(_) => Err(Error::Auth),
            None => new_session(&tampered[PrekeyLayout::IK..PrekeyLayout::EK], spk, opk),
        },
        PrekeyLayout::HAS_OPK => {
            if tampered[byte] > 1 {
                return Err(Error::Decode("has_opk"));
            }
            // The layout shifts by the 4 bytes of an opk id.
            let flipped = PrekeyLayout {
                has_opk: tampered[byte] == 1,
            };
            let opk = flipped.has_opk.then(|| u32_at(tampered, PrekeyLayout::OPK));
            if existing.is_none() {
                if let Some(id) = opk {
                    if store.one_time_prekey(id).is_none() {
                        return Err(Error::UnknownPrekey);
                    }
                }
            }
            let pn = u64::from(u32_at(tampered, flipped.header() + 32));
            let n = u64::from(u32_at(tampered, flipped.header() + 36));
            if pn > nr + MAX_SKIP || n > MAX_SKIP {
                Err(Error::TooManySkipped)
            } else {
                Err(Error::Auth)
            }
        }
        _ if layout.has_opk && byte < header => match existing {
            Some(_) => Err(Error::Auth),
            None => new_session(
                &tampered[PrekeyLayout::IK..PrekeyLayout::EK],
                spk,
                Some(u32_at(tampered, PrekeyLayout::OPK)),
            ),
        },
        _ => expect_header(original, tampered, header, byte, existing),
    }
}

/// Expected outcome of a flip at `byte` (at or after the header at
/// `header`) for a receiver whose current chain is the message's, at
/// `nr = existing` (or no session yet: `None`).
fn expect_header(
    original: &[u8],
    tampered: &[u8],
    header: usize,
    byte: usize,
    existing: Option<u32>,
) -> Result<(), Error> {
    let n = u64::from(u32_at(tampered, header + 36));
    let pn = u64::from(u32_at(tampered, header + 32));
    match existing {
        // No session: every ratchet key is new.
        None if (header + 32..header + 40).contains(&byte) => {
            if pn > MAX_SKIP || n > MAX_SKIP {
                Err(Error::TooManySkipped)
            } else {
                Err(Error::Auth)
            }
        }
        // The current chain: the header's n against Nr; pn is ignored.
        Some(nr) if (header + 36..header + 40).contains(&byte) => {
            let original_n = u32_at(original, header + 36);
            assert_eq!(original_n, nr, "the unaltered message is the next one");
            if n < u64::from(nr) {
                Err(Error::Duplicate)
            } else if n > u64::from(nr) + MAX_SKIP {
                Err(Error::TooManySkipped)
            } else {
                Err(Error::Auth)
            }
        }
        // A flipped ratchet key is a new key with the original pn and n
        // (all small), a flipped pn of the current key does not matter, and
        // the ciphertext and tag are authenticated.
        _ => Err(Error::Auth),
    }
}

fn same_kind(got: &Result<Vec<u8>, Error>, expected: &Result<(), Error>) -> bool {
    match (got, expected) {
        (Err(Error::Decode(_)), Err(Error::Decode(_))) => true,
        (Err(a), Err(b)) => a == b,
        _ => false,
    }
}

fn check_prekey_variants(with_opk: bool, existing: bool) {
    let dir = directory();
    let bundle = if with_opk {
        &dir.with_opk
    } else {
        &dir.without_opk
    };
    let mut rng = TestRng::new(0x7A3);
    let mut alice_session =
        Session::initiate(&mut rng, &alice(), bundle, SessionConfig::default()).expect("initiate");
    let first = alice_session
        .encrypt(&mut rng, b"first prekey message")
        .expect("encrypt");
    let second = alice_session
        .encrypt(&mut rng, b"second prekey message")
        .expect("encrypt");
    let mut bob = Bob::new();
    let (original, nr) = if existing {
        bob.receive(&first).expect("first accepted");
        (second, Some(1))
    } else {
        (first, None)
    };
    let layout = PrekeyLayout { has_opk: with_opk };
    let before = bob.state();
    let store = bob.store.clone();
    let mut checked = 0;
    for (variant, tampered) in variants(&original) {
        let expected = expect_prekey(&original, &layout, variant, &tampered, &store, nr);
        let got = bob.receive(&tampered);
        assert!(
            same_kind(&got, &expected),
            "prekey message (opk: {with_opk}, existing session: {existing}), {variant:?}: \
             expected {expected:?}, got {got:?}"
        );
        assert!(bob.state() == before, "{variant:?} changed Bob's state");
        checked += 1;
    }
    assert!(checked > 8 * original.len());
    // Nothing was consumed: the unaltered message is still accepted.
    let plaintext = bob.receive(&original).expect("unaltered message");
    assert!(plaintext.ends_with(b"prekey message"));
}

#[test]
fn tamper_new_prekey_message_with_one_time_prekey() {
    check_prekey_variants(true, false);
}

#[test]
fn tamper_new_prekey_message_without_one_time_prekey() {
    check_prekey_variants(false, false);
}

#[test]
fn tamper_repeated_prekey_message_with_one_time_prekey() {
    check_prekey_variants(true, true);
}

#[test]
fn tamper_repeated_prekey_message_without_one_time_prekey() {
    check_prekey_variants(false, true);
}

#[test]
fn tamper_normal_message() {
    let dir = directory();
    let mut rng = TestRng::new(0x7A4);
    let mut alice_session =
        Session::initiate(&mut rng, &alice(), &dir.with_opk, SessionConfig::default())
            .expect("initiate");
    let mut bob = Bob::new();
    bob.receive(&alice_session.encrypt(&mut rng, b"hi").expect("encrypt"))
        .expect("accepted");
    let bob_session = bob.session.as_mut().expect("session");
    let r0 = bob_session.encrypt(&mut rng, b"r0").expect("encrypt");
    let r1 = bob_session
        .encrypt(&mut rng, b"the reply under test")
        .expect("encrypt");
    assert_eq!(alice_session.decrypt(&r0).expect("r0"), b"r0");

    let before = alice_session.to_bytes().to_vec();
    let header = 2;
    for (variant, tampered) in variants(&r1) {
        let expected = match variant {
            Variant::Truncate { len } if len < header + 40 + 16 => Err(Error::Decode("short")),
            Variant::Truncate { .. } | Variant::Append => Err(Error::Auth),
            Variant::Flip { byte: 0 | 1, .. } => Err(Error::Decode("version or kind")),
            Variant::Flip { byte, .. } => expect_header(&r1, &tampered, header, byte, Some(1)),
        };
        let got = alice_session.decrypt(&tampered);
        assert!(
            same_kind(&got, &expected),
            "message, {variant:?}: expected {expected:?}, got {got:?}"
        );
        assert!(
            alice_session.to_bytes()[..] == before[..],
            "{variant:?} changed Alice's state"
        );
    }
    assert_eq!(
        alice_session.decrypt(&r1).expect("unaltered"),
        b"the reply under test"
    );
}

/// A normal message whose key is a stored skipped key: corruption of the
/// ciphertext fails `auth` with the stored key, which stays stored.
#[test]
fn tamper_message_with_stored_skipped_key() {
    let dir = directory();
    let mut rng = TestRng::new(0x7A5);
    let mut alice_session =
        Session::initiate(&mut rng, &alice(), &dir.with_opk, SessionConfig::default())
            .expect("initiate");
    let mut bob = Bob::new();
    bob.receive(&alice_session.encrypt(&mut rng, b"hi").expect("encrypt"))
        .expect("accepted");
    let bob_session = bob.session.as_mut().expect("session");
    let r0 = bob_session.encrypt(&mut rng, b"late").expect("encrypt");
    let r1 = bob_session.encrypt(&mut rng, b"r1").expect("encrypt");
    assert_eq!(alice_session.decrypt(&r1).expect("r1"), b"r1");
    assert_eq!(alice_session.skipped_message_keys(), 1);
    let before = alice_session.to_bytes().to_vec();
    for (variant, tampered) in variants(&r0) {
        let got = alice_session.decrypt(&tampered);
        let expected = match variant {
            Variant::Truncate { len } if len < 58 => Err(Error::Decode("short")),
            Variant::Flip { byte: 0 | 1, .. } => Err(Error::Decode("version or kind")),
            // n = 0 -> 1: under the current key and below Nr = 2, no stored
            // key: a duplicate.
            Variant::Flip { byte: 41, bit: 0 } => Err(Error::Duplicate),
            Variant::Flip { byte, .. } if (38..42).contains(&byte) => {
                let n = u64::from(u32_at(&tampered, 38));
                if n > 2 + MAX_SKIP {
                    Err(Error::TooManySkipped)
                } else {
                    Err(Error::Auth)
                }
            }
            _ => Err(Error::Auth),
        };
        assert!(
            same_kind(&got, &expected),
            "message with stored key, {variant:?}: expected {expected:?}, got {got:?}"
        );
        assert!(
            alice_session.to_bytes()[..] == before[..],
            "{variant:?} changed Alice's state"
        );
    }
    assert_eq!(alice_session.decrypt(&r0).expect("unaltered"), b"late");
    assert_eq!(alice_session.skipped_message_keys(), 0);
}

/// Bundles: every flip, truncation and an appended byte. The one-time
/// prekey is not signed (as in Signal's X3DH), so flips of its id or public
/// key verify; such a bundle is caught when the session it starts fails at
/// the responder.
#[test]
fn tamper_bundle() {
    let dir = directory();
    let policy = FreshnessPolicy::default();
    for original in [dir.with_opk.encode(), dir.without_opk.encode()] {
        const IK: std::ops::Range<usize> = 1..33;
        const HAS_OPK: usize = 141;
        for (variant, tampered) in variants(&original) {
            let result = PrekeyBundle::decode(&tampered).and_then(|b| b.verify(NOW, policy));
            let byte = match variant {
                Variant::Truncate { .. } | Variant::Append => {
                    assert!(
                        matches!(result, Err(Error::Decode(_))),
                        "bundle {variant:?}: {result:?}"
                    );
                    continue;
                }
                Variant::Flip { byte, .. } => byte,
            };
            match byte {
                0 | HAS_OPK => assert!(
                    matches!(result, Err(Error::Decode(_))),
                    "bundle {variant:?}: {result:?}"
                ),
                _ if IK.contains(&byte) => {
                    let expected = match IdentityKey::from_bytes(&tampered[IK]) {
                        Err(_) => Error::InvalidKey,
                        Ok(_) => Error::Signature,
                    };
                    assert_eq!(result.err(), Some(expected), "bundle {variant:?}");
                }
                _ if byte < HAS_OPK => {
                    assert_eq!(result.err(), Some(Error::Signature), "bundle {variant:?}")
                }
                // The unsigned one-time prekey: verifies, fails later. Every
                // third byte keeps the test fast. X25519 ignores the top bit
                // of a public key (RFC 7748), so that flip alone gives the
                // same DH4 and a working session.
                _ => {
                    let verified = result.expect("one-time prekey is not signed");
                    let top_bit_of_key = matches!(variant, Variant::Flip { byte: 177, bit: 7 });
                    if byte % 3 == 0 || top_bit_of_key {
                        check_tampered_one_time_prekey(&verified, &tampered, top_bit_of_key);
                    }
                }
            }
        }
    }
}

/// A session started from a bundle whose one-time prekey was altered never
/// gets its first message accepted, and consumes nothing (unless the only
/// change is the ignored top bit of the key: `equivalent`).
fn check_tampered_one_time_prekey(
    bundle: &cubbyhole::VerifiedBundle,
    bytes: &[u8],
    equivalent: bool,
) {
    let mut rng = TestRng::new(0x7A6);
    let mut alice_session =
        match Session::initiate(&mut rng, &alice(), bundle, SessionConfig::default()) {
            Ok(s) => s,
            // A low-order one-time prekey: DH4 is not contributory.
            Err(e) => {
                assert_eq!(e, Error::InvalidKey);
                return;
            }
        };
    let m = alice_session.encrypt(&mut rng, b"hi").expect("encrypt");
    let mut bob = Bob::new();
    if equivalent {
        assert_eq!(bob.receive(&m).expect("equivalent key"), b"hi");
        return;
    }
    let before = bob.state();
    let (id, _) = bundle.one_time_prekey().expect("has a one-time prekey");
    let expected = if bob.store.one_time_prekey(id).is_some() {
        Error::Auth
    } else {
        Error::UnknownPrekey
    };
    assert_eq!(
        bob.receive(&m).err(),
        Some(expected),
        "bundle {}",
        hex::encode(bytes)
    );
    assert!(bob.state() == before);
}

#[test]
fn unknown_version_or_kind_is_a_decode_error() {
    let dir = directory();
    let fx = targets::session_fixture();
    let message = &fx.undelivered[0].1;
    let prekey = &fx.sent[0].1;
    let bundle = dir.with_opk.encode();
    let mut bob = fx.bob.clone();
    let before = bob.to_bytes().to_vec();
    for v in 0..=255u8 {
        for original in [message, prekey] {
            let mut m = original.clone();
            if v != 0x01 {
                m[0] = v;
                assert!(matches!(Incoming::decode(&m), Err(Error::Decode(_))));
                assert!(matches!(bob.decrypt(&m), Err(Error::Decode(_))));
            }
            let mut m = original.clone();
            if v != 0x01 && v != 0x02 {
                m[1] = v;
                assert!(matches!(Incoming::decode(&m), Err(Error::Decode(_))));
                assert!(matches!(bob.decrypt(&m), Err(Error::Decode(_))));
            }
        }
        if v != 0x01 {
            let mut b = bundle.clone();
            b[0] = v;
            assert!(matches!(PrekeyBundle::decode(&b), Err(Error::Decode(_))));
        }
    }
    assert!(bob.to_bytes()[..] == before[..]);
}

// ---------------------------------------------------------------------------
// Decoders never panic
// ---------------------------------------------------------------------------

/// Valid inputs of every decoder, to mutate.
fn valid_inputs() -> Vec<Vec<u8>> {
    let dir = directory();
    let fx = targets::session_fixture();
    let mut out: Vec<Vec<u8>> = fx.sent.iter().map(|(_, m)| m.clone()).collect();
    out.push(dir.with_opk.encode());
    out.push(dir.without_opk.encode());
    out.push(fx.alice.to_bytes().to_vec());
    out.push(fx.bob.to_bytes().to_vec());
    out.push(dir.bob.public().as_bytes().to_vec());
    out.push(device_list());
    out
}

/// A signed device list of two devices (SPEC 25), signed by both.
fn device_list() -> Vec<u8> {
    let a = IdentityKeyPair::from_seed(&[1; 32]);
    let b = IdentityKeyPair::from_seed(&[2; 32]);
    let v1 = cubbyhole::DeviceList::genesis(&a, 1)
        .verify_genesis()
        .expect("genesis");
    let entries = [(&a, 1), (&b, 2)].map(|(k, id)| cubbyhole::DeviceEntry {
        identity: *k.public(),
        device_id: id,
    });
    let mut next = v1.successor(&entries).expect("successor");
    next.sign(&a).expect("a listed");
    next.sign(&b).expect("b listed");
    next.into_list().expect("signed").encode()
}

/// Runs every decoder on `bytes`; on success, the checks of the fuzz
/// targets (canonical re-encoding and the rest).
fn decode_everything(bytes: &[u8]) {
    targets::decode_incoming(bytes);
    targets::decode_bundle(bytes);
    targets::decode_state(bytes);
    // A device list decodes only from its one canonical encoding.
    if let Ok(list) = cubbyhole::DeviceList::decode(bytes) {
        assert_eq!(list.encode(), bytes);
    }
    match IdentityKey::from_bytes(bytes) {
        Ok(k) => assert_eq!(&k.as_bytes()[..], bytes),
        Err(Error::Decode(_)) => assert_ne!(bytes.len(), 32),
        Err(Error::InvalidKey) => assert_eq!(bytes.len(), 32),
        Err(e) => panic!("IdentityKey::from_bytes returned {e:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn decoders_never_panic_on_arbitrary_bytes(bytes in vec(any::<u8>(), 0..600)) {
        decode_everything(&bytes);
    }

    /// Arbitrary bytes behind a valid version and kind byte get past the
    /// first checks.
    #[test]
    fn decoders_never_panic_after_valid_leading_bytes(
        lead in prop_oneof![Just(vec![1u8, 1]), Just(vec![1u8, 2]), Just(vec![1u8, 0]), Just(vec![1u8])],
        bytes in vec(any::<u8>(), 0..300),
    ) {
        let mut m = lead;
        m.extend_from_slice(&bytes);
        decode_everything(&m);
    }

    #[test]
    fn decoders_never_panic_on_mutated_valid_inputs(
        which in any::<prop::sample::Index>(),
        edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let inputs = valid_inputs();
        let mut m = which.get(&inputs).clone();
        for (at, value) in edits {
            let i = at.index(m.len());
            m[i] = value;
        }
        if truncate {
            m.truncate(cut.index(m.len() + 1));
        }
        decode_everything(&m);
    }

    #[test]
    fn identity_keys_round_trip_or_are_rejected(bytes in prop::array::uniform32(any::<u8>())) {
        if let Ok(k) = IdentityKey::from_bytes(&bytes) {
            assert_eq!(k.as_bytes(), &bytes);
        }
    }
}

// ---------------------------------------------------------------------------
// Regression: reordered skipped-key chains
// ---------------------------------------------------------------------------

/// A stored state whose skipped-key chains are in an order the ratchet
/// never writes (the chain of the current receiving key not last) was once
/// accepted; a later skip then appended a second chain for the same key,
/// making a stored key unreachable and the state unrestorable. The decoder
/// now refuses such a state; if it ever accepts one again, the session must
/// stay consistent.
#[test]
fn reordered_skipped_chains_stay_consistent() {
    let fx = targets::session_fixture();
    let bytes = fx.bob.to_bytes().to_vec();
    // Bob's state ends with two chains: Alice's first chain (keys 0 and 2)
    // and her second, current one (key 0).
    assert_eq!(fx.bob.skipped_message_keys(), 3);
    let (first, second) = (32 + 4 + 2 * 36, 32 + 4 + 36);
    let start = bytes.len() - first - second;
    assert_eq!(bytes[start - 4..start], 2u32.to_be_bytes());
    let mut reordered = bytes[..start].to_vec();
    reordered.extend_from_slice(&bytes[start + first..]);
    reordered.extend_from_slice(&bytes[start..start + first]);
    let mut bob = match targets::restore_as(&reordered, &fx.bob) {
        Err(e) => {
            assert_eq!(e, cubbyhole::Error::State("state skipped chain order"));
            return;
        }
        Ok(bob) => bob,
    };
    // Alice's messages to Bob: a0 a1 a2 (chain 1), a3 a4 (chain 2), then
    // the undelivered a5, a6.
    let a3 = &fx
        .sent
        .iter()
        .filter(|(to_bob, _)| *to_bob)
        .nth(3)
        .expect("a3")
        .1;
    let a6 = &fx.undelivered[1].1;
    assert_eq!(bob.decrypt(a6).expect("a6"), b"a6");
    targets::restore_as(&bob.to_bytes(), &bob).expect("state after a genuine message restores");
    assert_eq!(bob.decrypt(a3).expect("a3"), b"a3");
}
