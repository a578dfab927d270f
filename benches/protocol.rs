//! Benchmarks of cubbyhole's operations beside the primitives they are made
//! of, so that every figure reads as a ratio to its floor.
//!
//! ```text
//! cargo bench --bench protocol                      # everything
//! cargo bench --bench protocol -- floor/            # only the primitives
//! cargo bench --bench protocol -- --warm-up-time 1 --measurement-time 3
//! scripts/bench-report.sh                           # then the table of ratios
//! ```
//!
//! Two groups:
//!
//! - `floor`: the primitives, called directly on the crates cubbyhole uses
//!   (x25519-dalek, ed25519-dalek, hkdf, hmac, sha2, aes-gcm), with the
//!   input sizes the protocol uses.
//! - `protocol`: cubbyhole's own operations. Each bench function says in a
//!   one-line comment which floor operations it performs, so the expected
//!   time is the sum of those floor figures; the rest is overhead (parsing,
//!   copying, allocation, bookkeeping). `examples/bench_report.rs` holds the
//!   same decompositions as data and prints each step's median beside its
//!   floor and the ratio (BENCHMARKS.md).
//!
//! Floor terms used in the comments: KG = `x25519_keygen`, DH =
//! `x25519_dh`, VERIFY = `ed25519_verify_strict_70B`, DECOMPRESS =
//! `ed25519_decompress`, MONT = `ed25519_to_montgomery`, HKDF(L) =
//! `hkdf_sha256/L`, HKDF(32, ikm N) = `hkdf_sha256_ikmN/32`, KDF_CK =
//! `hmac_sha256_1B_pair`, SEAL(n) / OPEN(n) = `aes256gcm_seal/n` /
//! `aes256gcm_open/n`.
//!
//! All randomness comes from a ChaCha20 generator with a fixed seed, so runs
//! are reproducible (the generator's own cost, a few ns per 32 bytes, is
//! included wherever the protocol draws keys).

use std::hint::black_box;

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BatchSize, BenchmarkGroup, BenchmarkId, Criterion,
};
use cubbyhole::{
    hazmat, FreshnessPolicy, IdentityKey, IdentityKeyPair, Incoming, PrekeyBundle, PrekeyLookup,
    PrekeyStore, Session, SessionConfig,
};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};

type Group<'a> = BenchmarkGroup<'a, WallTime>;

/// Unix time at which bundles are created and verified.
const NOW: u64 = 1_700_000_000;
/// Plaintext sizes of the AEAD and steady-state benches.
const SIZES: [usize; 3] = [64, 1024, 16 * 1024];
/// Plaintext size of the handshake, ping-pong and skip benches.
const SMALL: usize = 64;
/// AAD length of a normal message: AD (64) + version, kind, header (42).
const MESSAGE_AAD_LEN: usize = 64 + 2 + 40;

fn rng() -> ChaCha20Rng {
    ChaCha20Rng::seed_from_u64(0x6375_6262_7968_6f6c)
}

fn random<const N: usize>(rng: &mut ChaCha20Rng) -> [u8; N] {
    let mut out = [0u8; N];
    rng.fill_bytes(&mut out);
    out
}

// ---------------------------------------------------------------------------
// floor
// ---------------------------------------------------------------------------

fn floor(c: &mut Criterion) {
    let mut g = c.benchmark_group("floor");
    floor_x25519_keygen(&mut g);
    floor_x25519_dh(&mut g);
    floor_ed25519_verify(&mut g);
    floor_ed25519_decode(&mut g);
    floor_hkdf(&mut g);
    floor_hmac(&mut g);
    floor_aes_gcm(&mut g);
    g.finish();
}

/// X25519 key generation: 32 random bytes, StaticSecret, PublicKey::from
/// (one fixed-base scalar multiplication, precomputed tables).
fn floor_x25519_keygen(g: &mut Group<'_>) {
    let mut rng = rng();
    g.bench_function("x25519_keygen", |b| {
        b.iter(|| {
            let secret = StaticSecret::from(random::<32>(&mut rng));
            PublicKey::from(&secret)
        })
    });
}

/// One X25519 Diffie-Hellman (variable-base scalar multiplication).
fn floor_x25519_dh(g: &mut Group<'_>) {
    let mut rng = rng();
    let secret = StaticSecret::from(random::<32>(&mut rng));
    let public = PublicKey::from(&StaticSecret::from(random::<32>(&mut rng)));
    g.bench_function("x25519_dh", |b| {
        b.iter(|| secret.diffie_hellman(black_box(&public)).to_bytes())
    });
}

/// One Ed25519 verify_strict of a 70-byte message (the size of a signed
/// prekey's signed message), public key already decoded.
fn floor_ed25519_verify(g: &mut Group<'_>) {
    let mut rng = rng();
    let signing = SigningKey::from_bytes(&random::<32>(&mut rng));
    let verifying = signing.verifying_key();
    let message = random::<70>(&mut rng);
    let signature = signing.sign(&message);
    g.bench_function("ed25519_verify_strict_70B", |b| {
        b.iter(|| {
            verifying
                .verify_strict(black_box(&message), black_box(&signature))
                .expect("valid signature")
        })
    });
}

/// What decoding an identity key needs from the curve crates: Ed25519 point
/// decompression (`VerifyingKey::from_bytes`: one field exponentiation) and
/// the birational map to the Montgomery u-coordinate (`to_montgomery`: one
/// field inversion), used to run X25519 with an Ed25519 identity key. Every
/// bundle decode, first prekey message and state decode pays both.
fn floor_ed25519_decode(g: &mut Group<'_>) {
    let mut rng = rng();
    let verifying = SigningKey::from_bytes(&random::<32>(&mut rng)).verifying_key();
    let bytes = verifying.to_bytes();
    g.bench_function("ed25519_decompress", |b| {
        b.iter(|| VerifyingKey::from_bytes(black_box(&bytes)).expect("valid key"))
    });
    g.bench_function("ed25519_to_montgomery", |b| {
        b.iter(|| black_box(&verifying).to_montgomery().to_bytes())
    });
}

/// HKDF-SHA-256 extract + expand of a 32-byte ikm with a 32-byte salt, to 32
/// (X3DH), 44 (message keys) and 64 (root KDF) bytes. X3DH's own ikm is 128
/// or 160 bytes: `hkdf_sha256_ikm128/32` and `hkdf_sha256_ikm160/32`
/// measure those (both extracts hash the same number of SHA-256 blocks, so
/// they should agree).
fn floor_hkdf(g: &mut Group<'_>) {
    let salt = [0x5au8; 32];
    let ikm = [0xa5u8; 160];
    for len in [32usize, 44, 64] {
        let mut okm = vec![0u8; len];
        g.bench_with_input(BenchmarkId::new("hkdf_sha256", len), &len, |b, _| {
            b.iter(|| {
                Hkdf::<Sha256>::new(Some(&salt), black_box(&ikm[..32]))
                    .expand(b"cubbyhole/v1 message", &mut okm)
                    .expect("valid HKDF length");
                okm[0]
            })
        });
    }
    let mut okm = [0u8; 32];
    for ikm_len in [128usize, 160] {
        g.bench_function(format!("hkdf_sha256_ikm{ikm_len}/32"), |b| {
            b.iter(|| {
                Hkdf::<Sha256>::new(Some(&salt), black_box(&ikm[..ikm_len]))
                    .expand(b"cubbyhole/v1 x3dh", &mut okm)
                    .expect("valid HKDF length");
                okm[0]
            })
        });
    }
}

/// HMAC-SHA-256 of one byte under a 32-byte key, key setup included; and
/// `hmac_sha256_1B_pair`, the shape of one chain step KDF_CK: one key setup
/// (the ipad and opad blocks), cloned, then the MACs of 0x01 and 0x02. The
/// pair is the floor of a chain step, as the ratchet computes it; two
/// separate `hmac_sha256_1B` would count the key setup twice.
fn floor_hmac(g: &mut Group<'_>) {
    let key = [0x42u8; 32];
    g.bench_function("hmac_sha256_1B", |b| {
        b.iter(|| {
            let mut mac =
                <Hmac<Sha256> as Mac>::new_from_slice(black_box(&key)).expect("any key length");
            mac.update(&[0x01]);
            mac.finalize().into_bytes()
        })
    });
    g.bench_function("hmac_sha256_1B_pair", |b| {
        b.iter(|| {
            let keyed =
                <Hmac<Sha256> as Mac>::new_from_slice(black_box(&key)).expect("any key length");
            let mut first = keyed.clone();
            first.update(&[0x01]);
            let mut second = keyed;
            second.update(&[0x02]);
            (
                first.finalize().into_bytes(),
                second.finalize().into_bytes(),
            )
        })
    });
}

/// AES-256-GCM seal and open of 64 B, 1 KiB and 16 KiB with a 106-byte AAD
/// (a normal message's), key setup included (every message has its own
/// key). Open decrypts a fresh copy of the sealed buffer each time (the copy
/// is made outside the timing).
fn floor_aes_gcm(g: &mut Group<'_>) {
    let mut rng = rng();
    let key = random::<32>(&mut rng);
    let nonce = random::<12>(&mut rng);
    let aad = [0x17u8; MESSAGE_AAD_LEN];
    for size in SIZES {
        let mut buf = vec![0x33u8; size];
        g.bench_with_input(BenchmarkId::new("aes256gcm_seal", size), &size, |b, _| {
            b.iter(|| {
                let cipher = Aes256Gcm::new(black_box(&key).into());
                cipher
                    .encrypt_in_place_detached(Nonce::from_slice(&nonce), &aad, &mut buf)
                    .expect("short plaintext")
            })
        });
    }
    for size in SIZES {
        let mut sealed = vec![0x33u8; size];
        let tag = Aes256Gcm::new((&key).into())
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), &aad, &mut sealed)
            .expect("short plaintext");
        g.bench_with_input(BenchmarkId::new("aes256gcm_open", size), &size, |b, _| {
            b.iter_batched_ref(
                || sealed.clone(),
                |buf| {
                    let cipher = Aes256Gcm::new(black_box(&key).into());
                    cipher
                        .decrypt_in_place_detached(Nonce::from_slice(&nonce), &aad, buf, &tag)
                        .expect("authentic")
                },
                BatchSize::SmallInput,
            )
        });
    }
}

// ---------------------------------------------------------------------------
// protocol
// ---------------------------------------------------------------------------

/// Bob's side of a handshake: identity and prekeys, and his encoded bundles
/// with and without a one-time prekey.
struct Responder {
    identity: IdentityKeyPair,
    prekeys: PrekeyStore,
    bundle_with_opk: Vec<u8>,
    bundle_without_opk: Vec<u8>,
}

impl Responder {
    fn new(rng: &mut ChaCha20Rng) -> Self {
        let identity = IdentityKeyPair::generate(rng);
        let mut prekeys = PrekeyStore::new(rng, &identity, NOW).expect("time in unix seconds");
        let bundle_without_opk = prekeys.bundle(&identity).encode();
        prekeys.generate_one_time_prekeys(rng, 1);
        let bundle_with_opk = prekeys.bundle(&identity).encode();
        Responder {
            identity,
            prekeys,
            bundle_with_opk,
            bundle_without_opk,
        }
    }

    fn bundle(&self, with_opk: bool) -> &[u8] {
        if with_opk {
            &self.bundle_with_opk
        } else {
            &self.bundle_without_opk
        }
    }
}

fn verify_bundle(bytes: &[u8]) -> cubbyhole::bundle::VerifiedBundle {
    PrekeyBundle::decode(bytes)
        .and_then(|b| b.verify(NOW, FreshnessPolicy::default()))
        .expect("valid bundle")
}

/// Two established sessions after A→B (prekey message), B→A, A→B, B→A: each
/// side has done a DH ratchet step, and Alice has just received, so her next
/// send starts a new sending chain.
fn established(rng: &mut ChaCha20Rng) -> (Session, Session) {
    let bob = Responder::new(rng);
    let alice = IdentityKeyPair::generate(rng);
    let config = SessionConfig::default();
    let mut a =
        Session::initiate(rng, &alice, &verify_bundle(bob.bundle(true)), config).expect("initiate");
    let first = a.encrypt(rng, b"hello").expect("encrypt");
    let incoming = Incoming::decode(&first).expect("decode");
    let mut b = Session::accept(&bob.identity, &bob.prekeys, &incoming, config)
        .expect("accept")
        .session;
    for _ in 0..2 {
        let m = b.encrypt(rng, b"ping").expect("encrypt");
        a.decrypt(&m).expect("decrypt");
        let m = a.encrypt(rng, b"pong").expect("encrypt");
        b.decrypt(&m).expect("decrypt");
    }
    let m = b.encrypt(rng, b"ping").expect("encrypt");
    a.decrypt(&m).expect("decrypt");
    assert!(!a.sends_prekey_messages());
    (a, b)
}

/// Like [`established`], then Alice sends one message that Bob decrypts, so
/// that Alice's further messages are in Bob's current receiving chain.
fn steady(rng: &mut ChaCha20Rng) -> (Session, Session) {
    let (mut a, mut b) = established(rng);
    let m = a.encrypt(rng, b"warm-up").expect("encrypt");
    b.decrypt(&m).expect("decrypt");
    (a, b)
}

fn protocol(c: &mut Criterion) {
    let mut g = c.benchmark_group("protocol");
    identity_key_decode(&mut g);
    bundle_decode(&mut g);
    bundle_decode_verify(&mut g);
    x3dh_initiator(&mut g);
    x3dh_responder(&mut g);
    initiate(&mut g);
    first_message(&mut g);
    accept(&mut g);
    encrypt(&mut g);
    decrypt(&mut g);
    ping_pong(&mut g);
    state(&mut g);
    g.sample_size(20);
    skip(&mut g);
    g.finish();
}

/// identity key decode: DECOMPRESS (1 field exponentiation) + small-order
/// check (3 doublings, not in the floor) + MONT (1 field inversion); the
/// canonical-y check is a byte comparison. Part of every bundle decode,
/// first prekey message and state decode.
fn identity_key_decode(g: &mut Group<'_>) {
    let key = *IdentityKeyPair::generate(&mut rng()).public().as_bytes();
    g.bench_function("identity_key_decode", |b| {
        b.iter(|| IdentityKey::from_bytes(black_box(&key)).expect("valid key"))
    });
}

/// bundle decode: DECOMPRESS + MONT (the identity key) + parsing.
fn bundle_decode(g: &mut Group<'_>) {
    let bob = Responder::new(&mut rng());
    g.bench_function("bundle_decode", |b| {
        b.iter(|| PrekeyBundle::decode(black_box(bob.bundle(true))).expect("valid bundle"))
    });
}

/// bundle verification (decode + verify, from the directory's bytes):
/// DECOMPRESS + MONT + VERIFY (verify_strict of the 70-byte signed message).
fn bundle_decode_verify(g: &mut Group<'_>) {
    let bob = Responder::new(&mut rng());
    g.bench_function("bundle_decode_verify", |b| {
        b.iter(|| verify_bundle(black_box(bob.bundle(true))))
    });
}

/// X3DH alone, initiator side, from the bundle's bytes to SK and AD: bundle
/// decode + verify, EK_A's key generation, then `hazmat::x3dh_initiator`
/// (the X3DH of `Session::initiate`, without the ratchet's initialisation):
/// - with OPK: DECOMPRESS + MONT + VERIFY + KG + 4 DH + HKDF(32, ikm 160);
/// - without: DECOMPRESS + MONT + VERIFY + KG + 3 DH + HKDF(32, ikm 128).
fn x3dh_initiator(g: &mut Group<'_>) {
    let mut rng = rng();
    let bob = Responder::new(&mut rng);
    let alice = IdentityKeyPair::generate(&mut rng);
    for (name, with_opk) in [("opk", true), ("no_opk", false)] {
        let bytes = bob.bundle(with_opk);
        g.bench_function(BenchmarkId::new("x3dh_initiator", name), |b| {
            b.iter(|| {
                let bundle = verify_bundle(black_box(bytes));
                let ephemeral = random::<32>(&mut rng);
                let ephemeral_public = PublicKey::from(&StaticSecret::from(ephemeral));
                let values =
                    hazmat::x3dh_initiator(&alice, &ephemeral, &bundle).expect("contributory");
                (ephemeral_public, values)
            })
        });
    }
}

/// X3DH alone, responder side, from the prekey message's IK_A and EK_A to SK
/// and AD: IK_A's decode, then `hazmat::x3dh_responder` (the X3DH of
/// `Session::accept`, without the ratchet or the first message):
/// - with OPK: DECOMPRESS + MONT + 4 DH + HKDF(32, ikm 160);
/// - without: DECOMPRESS + MONT + 3 DH + HKDF(32, ikm 128).
fn x3dh_responder(g: &mut Group<'_>) {
    let mut rng = rng();
    let bob = Responder::new(&mut rng);
    let alice = *IdentityKeyPair::generate(&mut rng).public().as_bytes();
    let ephemeral = PublicKey::from(&StaticSecret::from(random::<32>(&mut rng))).to_bytes();
    for (name, with_opk) in [("opk", true), ("no_opk", false)] {
        let bundle = verify_bundle(bob.bundle(with_opk));
        let signed_prekey = bob
            .prekeys
            .signed_prekey(bundle.signed_prekey_id())
            .expect("current signed prekey");
        let one_time_prekey = bundle
            .one_time_prekey()
            .map(|(id, _)| bob.prekeys.one_time_prekey(id).expect("one-time prekey"));
        g.bench_function(BenchmarkId::new("x3dh_responder", name), |b| {
            b.iter(|| {
                let initiator = IdentityKey::from_bytes(black_box(&alice)).expect("valid key");
                hazmat::x3dh_responder(
                    &bob.identity,
                    signed_prekey,
                    one_time_prekey,
                    &initiator,
                    black_box(&ephemeral),
                )
                .expect("contributory")
            })
        });
    }
}

/// initiator session (bundle decode + verify + Session::initiate): the
/// X3DH above plus the ratchet's eager first sending key (RatchetInitAlice):
/// - with OPK: DECOMPRESS + MONT + VERIFY + 2 KG + 5 DH + HKDF(32, ikm 160) +
///   HKDF(64);
/// - without: DECOMPRESS + MONT + VERIFY + 2 KG + 4 DH + HKDF(32, ikm 128) +
///   HKDF(64).
fn initiate(g: &mut Group<'_>) {
    let mut rng = rng();
    let bob = Responder::new(&mut rng);
    let alice = IdentityKeyPair::generate(&mut rng);
    for (name, with_opk) in [("opk", true), ("no_opk", false)] {
        let bytes = bob.bundle(with_opk);
        g.bench_function(BenchmarkId::new("initiate", name), |b| {
            b.iter(|| {
                let bundle = verify_bundle(black_box(bytes));
                Session::initiate(&mut rng, &alice, &bundle, SessionConfig::default())
                    .expect("initiate")
            })
        });
    }
}

/// first prekey message creation, from the bundle's bytes to the wire bytes
/// of a first 64-byte message (bundle decode + verify + Session::initiate +
/// Session::encrypt): `initiate` + KDF_CK + HKDF(44) + SEAL(64) (its AAD is
/// 179 or 175 bytes, the prekey fields included, against the floor's 106):
/// - with OPK: DECOMPRESS + MONT + VERIFY + 2 KG + 5 DH + HKDF(32, ikm 160) +
///   HKDF(64) + KDF_CK + HKDF(44) + SEAL(64);
/// - without: the same with 4 DH and HKDF(32, ikm 128).
fn first_message(g: &mut Group<'_>) {
    let mut rng = rng();
    let bob = Responder::new(&mut rng);
    let alice = IdentityKeyPair::generate(&mut rng);
    let plaintext = [0x61u8; SMALL];
    for (name, with_opk) in [("opk", true), ("no_opk", false)] {
        let bytes = bob.bundle(with_opk);
        g.bench_function(BenchmarkId::new("first_message", name), |b| {
            b.iter(|| {
                let bundle = verify_bundle(black_box(bytes));
                let mut session =
                    Session::initiate(&mut rng, &alice, &bundle, SessionConfig::default())
                        .expect("initiate");
                let wire = session.encrypt(&mut rng, &plaintext).expect("encrypt");
                (session, wire)
            })
        });
    }
}

/// responder's session creation from the first 64-byte prekey message
/// (Incoming::decode + Session::accept; PrekeyStore::accept adds only the
/// removal of the one-time prekey from a BTreeMap, and would consume it, so
/// Session::accept is measured). The ratchet's first receiving chain is a
/// DH ratchet step with SPK_B as DHs: one more DH and a root KDF.
/// - with OPK: DECOMPRESS + MONT + 5 DH + HKDF(32, ikm 160) + HKDF(64) +
///   KDF_CK + HKDF(44) + OPEN(64);
/// - without: DECOMPRESS + MONT + 4 DH + HKDF(32, ikm 128) + HKDF(64) +
///   KDF_CK + HKDF(44) + OPEN(64).
fn accept(g: &mut Group<'_>) {
    let mut rng = rng();
    let bob = Responder::new(&mut rng);
    let alice = IdentityKeyPair::generate(&mut rng);
    let config = SessionConfig::default();
    for (name, with_opk) in [("opk", true), ("no_opk", false)] {
        let bundle = verify_bundle(bob.bundle(with_opk));
        let message = Session::initiate(&mut rng, &alice, &bundle, config)
            .and_then(|mut s| s.encrypt(&mut rng, &[0x61; SMALL]))
            .expect("first message");
        g.bench_function(BenchmarkId::new("accept", name), |b| {
            b.iter(|| {
                let incoming = Incoming::decode(black_box(&message)).expect("decode");
                Session::accept(&bob.identity, &bob.prekeys, &incoming, config).expect("accept")
            })
        });
    }
}

/// steady-state encrypt (Session::encrypt, same sending chain every time):
/// KDF_CK + HKDF(44) + SEAL(n); the rest is the header, the AAD copy and the
/// output allocation.
fn encrypt(g: &mut Group<'_>) {
    let mut rng = rng();
    for size in SIZES {
        let (mut alice, _) = steady(&mut rng);
        let plaintext = vec![0x61u8; size];
        g.bench_with_input(BenchmarkId::new("encrypt", size), &size, |b, _| {
            b.iter(|| {
                alice
                    .encrypt(&mut rng, black_box(&plaintext))
                    .expect("encrypt")
            })
        });
    }
}

/// steady-state decrypt (Session::decrypt of the next message in the current
/// receiving chain): KDF_CK + HKDF(44) + OPEN(n); the rest is the decode,
/// the AAD copy and the output allocation.
/// The receiving session is cloned before each iteration (BatchSize::SmallInput,
/// clone not timed) and always decrypts the same message; only decrypt is timed,
/// and the session and plaintext are dropped outside the timing.
fn decrypt(g: &mut Group<'_>) {
    let mut rng = rng();
    for size in SIZES {
        let (mut alice, bob) = steady(&mut rng);
        let message = alice
            .encrypt(&mut rng, &vec![0x61u8; size])
            .expect("encrypt");
        g.bench_with_input(BenchmarkId::new("decrypt", size), &size, |b, _| {
            b.iter_batched(
                || bob.clone(),
                |mut session| {
                    let plaintext = session.decrypt(black_box(&message)).expect("decrypt");
                    (session, plaintext)
                },
                BatchSize::SmallInput,
            )
        });
    }
}

/// round trip A→B→A of 64-byte messages, a DH ratchet step each way. Each
/// side has just received when it sends, so each encrypt runs the lazy
/// sending half (KG + DH + HKDF(64)) and each decrypt the receiving half
/// (DH + HKDF(64)): 2 KG + 4 DH + 4 HKDF(64) + 4 KDF_CK + 4 HKDF(44) +
/// 2 SEAL(64) + 2 OPEN(64).
fn ping_pong(g: &mut Group<'_>) {
    let mut rng = rng();
    let (mut alice, mut bob) = established(&mut rng);
    let plaintext = [0x61u8; SMALL];
    g.bench_function("ping_pong", |b| {
        b.iter(|| {
            let m = alice.encrypt(&mut rng, &plaintext).expect("encrypt");
            bob.decrypt(&m).expect("decrypt");
            let m = bob.encrypt(&mut rng, &plaintext).expect("encrypt");
            alice.decrypt(&m).expect("decrypt")
        })
    });
}

/// session state encode (to_bytes): no cryptography (no floor), copies +
/// zeroize on drop; decode (from_bytes): one X25519 fixed-base
/// multiplication (our ratchet public key, recomputed when the state holds
/// our ratchet secret: 1 KEYGEN) + parsing; the identity keys are given,
/// not decoded.
/// Measured for a steady-state session (no skipped keys) and one holding 999
/// skipped message keys.
fn state(g: &mut Group<'_>) {
    let mut rng = rng();
    let (mut alice, bob) = steady(&mut rng);
    let mut holding = bob.clone();
    let mut last = Vec::new();
    for _ in 0..1000 {
        last = alice.encrypt(&mut rng, b"x").expect("encrypt");
    }
    holding.decrypt(&last).expect("decrypt");
    assert_eq!(holding.skipped_message_keys(), 999);
    for (name, session) in [("steady", &bob), ("skipped_999", &holding)] {
        let bytes = session.to_bytes();
        g.bench_function(BenchmarkId::new("state_encode", name), |b| {
            b.iter(|| black_box(session).to_bytes())
        });
        g.bench_function(BenchmarkId::new("state_decode", name), |b| {
            b.iter(|| {
                Session::from_bytes(
                    black_box(&bytes),
                    session.local_identity(),
                    session.remote_identity(),
                )
                .expect("decode")
            })
        });
    }
}

/// skip: decrypt the last of N messages first (derives and stores N-1
/// skipped keys), then the other N-1 from the stored keys, one measurement for
/// all N: N KDF_CK + N HKDF(44) + N OPEN(64). N = 1000 (skip 999, the
/// profile's MAX_SKIP allows up to 1000) and N = 100: the cost per message
/// should be the same for both (linear in N).
fn skip(g: &mut Group<'_>) {
    let mut rng = rng();
    for n in [100usize, 1000] {
        let (mut alice, bob) = steady(&mut rng);
        let messages: Vec<Vec<u8>> = (0..n)
            .map(|_| alice.encrypt(&mut rng, &[0x61u8; SMALL]).expect("encrypt"))
            .collect();
        g.bench_with_input(BenchmarkId::new("skip", n), &n, |b, _| {
            b.iter_batched(
                || bob.clone(),
                |mut session| {
                    let (last, rest) = messages.split_last().expect("n > 0");
                    session.decrypt(last).expect("decrypt last");
                    for m in rest {
                        session.decrypt(m).expect("decrypt skipped");
                    }
                    session
                },
                BatchSize::SmallInput,
            )
        });
    }
}

criterion_group!(benches, floor, protocol);
criterion_main!(benches);
