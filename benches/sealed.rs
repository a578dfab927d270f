//! Profile v2 (issue 17, SPEC.md section 26) beside profile v1, in one run,
//! each operation beside the primitives it is made of (its floor), so that
//! every figure reads as a ratio.
//!
//! ```text
//! cargo bench --features sqlite --bench sealed      # ~3 min (100 s: the 100,000 sessions)
//! cargo bench --features sqlite --bench sealed -- --warm-up-time 1 --measurement-time 3
//! cargo bench --features sqlite --bench sealed -- 'sealed/routing/1000/'
//! ```
//!
//! Without the `sqlite` feature the SQLite index benches are left out (and
//! say so). At the end of a measuring run the bench prints a Markdown
//! report from this run's criterion medians (`<criterion
//! dir>/sealed/**/new/estimates.json` written since the run started): each
//! step beside the sum of its floor terms, v2 beside v1, and the routing
//! figures. Before any timing (every run, `--test` included) it prints the
//! bytes v2 adds to a message and checks them against real payloads.
//!
//! Benches (criterion group `sealed`; 64-byte plaintexts):
//!
//! - `floor/*`: the primitives, called directly on the crates cubbyhole uses,
//!   with v1's and v2's input sizes (terms below).
//! - `v1/encrypt/64`, `v1/decrypt/64`, `v2/seal/64`, `v2/open/64`: a chain
//!   message in a steady session (same sending chain; the next message of
//!   the receiver's current chain, opened on a clone of the session).
//! - `v1/ping_pong`, `v2/ping_pong`: A→B→A, a DH ratchet step each way (for
//!   v2, each open of a new chain also scans the W tags of the current
//!   chain before it finds the tag in the next one: the locate cost).
//! - `v1/prekey/encrypt/64`, `v1/prekey/accept/64`, `v2/prekey/seal/64`,
//!   `v2/prekey/accept/64`, and `v2/open_sealed/K` for K = 1, 2, 3 signed
//!   prekeys held, the message sealed to the one tried last (K trials).
//! - `v1/trial_decrypt_fail`: one step of v1's fallback for a message that
//!   starts a new chain (no index knows its ratchet key): `Session::decrypt`
//!   by a session awaiting a new ratchet key that does not own the message
//!   (fails with `Auth`). v1's receive of such a message costs up to k of
//!   these for k awaiting sessions (the report scales it; not run k times).
//! - `routing/N/{hashmap,sqlite}/lookup`: one index lookup of an expected
//!   tag (4,096 tags of random sessions, in turn), N = 10, 1,000, 100,000
//!   sessions; `routing/N/{hashmap,sqlite}/envelope`: what a client does
//!   per chain message: the lookup of its id, then `Session::open` of the
//!   session found (a clone, made outside the timing). The envelopes start
//!   a new chain (the peer read the receiver's last message: every turn of
//!   a conversation), the case v1 routes by trial decryption.
//!
//! The routing world: one receiver (Bob) and N peers, each with its own
//! identity, a v2 session from X3DH (Bob's bundle without one-time
//! prekey), a sealed prekey message Bob opens and accepts, and a reply
//! Bob seals, so each of Bob's sessions expects 2W tags (W = 32): its
//! current receiving chain's next W and the peer's next chain's first W.
//! Every session has its own keys (nothing is cloned). It is built once per
//! N, outside any timing, on up to 4 threads; the bench prints how long.
//! The index holds every session's `routing_tags(W)`: a
//! `HashMap<[u8; 16], usize>` and, separately, a SQLite table `routes(key
//! BLOB PRIMARY KEY, peer INTEGER) WITHOUT ROWID` in a temporary file (WAL,
//! the store's settings; the connection reopened with SQLite's default
//! cache of 2 MiB before timing). In `--test` mode (CI) the 100,000-session
//! case is skipped (its setup takes about a minute) and says so; 10 and
//! 1,000 run the same code.
//!
//! Floor terms (all with their key setup): KG = `x25519_keygen`, DH =
//! `x25519_dh`, DECOMPRESS / MONT = `ed25519_decompress` /
//! `ed25519_to_montgomery` (decoding IK_A), HKDF(44), HKDF(64) =
//! `hkdf_sha256/44|64` (32-byte ikm and salt), HKDF(32, ikm 128) = X3DH's SK,
//! HKDF_SEAL = `hkdf_sha256_seal/44` (the seal's info of 81 bytes), KDF_CK =
//! `hmac_sha256_1B_pair`, HMAC = `hmac_sha256_23B` (tag(HK, n): 20 bytes,
//! hkey(HK, n): 23 bytes, HK(rk): 23 bytes; each one SHA-256 block after the
//! key block, so one figure), SEAL(n) / OPEN(n) = AES-256-GCM of n bytes
//! with a 106-byte AAD (the body; v2's padded: 438 bytes in a 512-byte chain
//! message, 335 in a sealed prekey message), SEAL_H / OPEN_H = 40 bytes
//! with an 18-byte AAD (the header), SEAL_P / OPEN_P = 462 bytes with a
//! 34-byte AAD (the seal of a prekey message). Randomness: seeded ChaCha20.

use std::cell::{Cell, OnceCell};
use std::collections::HashMap;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use criterion::measurement::WallTime;
use criterion::{BatchSize, BenchmarkGroup, Criterion};
use cubbyhole::sealed::{self, size_class, CHAIN_OVERHEAD};
use cubbyhole::{
    FreshnessPolicy, IdentityKeyPair, Incoming, PrekeyBundle, PrekeyStore, Sealed, Session,
    SessionConfig, VerifiedBundle,
};
use ed25519_dalek::{SigningKey, VerifyingKey};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};

type Group<'a> = BenchmarkGroup<'a, WallTime>;

/// Unix time at which bundles are made and verified.
const NOW: u64 = 1_900_000_000;
/// The routing window (the client's default).
const W: u32 = 32;
/// The plaintext of every timed message.
const SMALL: usize = 64;
/// AAD of a message body: AD (64) + version, kind, header (42).
const BODY_AAD: usize = 106;
/// The padded body of a 64-byte chain message: 512 - 74.
const CHAIN_BODY: usize = 438;
/// The padded body of a 64-byte sealed prekey message: 512 - 177.
const PREKEY_BODY: usize = 335;
/// The sealed inner prekey message: 512 - 2 - 32 - 16.
const SEALED_INNER: usize = 462;
/// Session counts of the routing benches.
const ROUTING_SIZES: [usize; 3] = [10, 1_000, 100_000];
/// Sessions that receive the timed envelopes (fewer when N is smaller).
const TARGETS: usize = 64;
/// Tags looked up in turn by the lookup benches.
const PROBES: usize = 4096;

fn rng() -> ChaCha20Rng {
    ChaCha20Rng::seed_from_u64(0x7632_7365_616c_6564)
}

fn random<const N: usize>(rng: &mut ChaCha20Rng) -> [u8; N] {
    let mut out = [0u8; N];
    rng.fill_bytes(&mut out);
    out
}

fn test_mode() -> bool {
    std::env::args().any(|a| a == "--test")
}

// ---------------------------------------------------------------------------
// sizes
// ---------------------------------------------------------------------------

/// The bytes v2 adds to a message, from the size classes, checked against
/// hand-computed lengths and real payloads; printed.
fn sizes() {
    let mut rng = rng();
    let bob = Responder::new(&mut rng, true);
    let bob_plain = Responder::new(&mut rng, false);
    let alice = IdentityKeyPair::generate(&mut rng);
    let config = SessionConfig::default();
    // Hand-computed (SPEC.md 8 and 26.5): v1 chain = 2 + 40 + L + 16; v1
    // prekey = 111 (115 with a one-time prekey) + L + 16; v2 = the PADME
    // class of overhead + L + 1 (the 0x80): 512; 1,099 -> 1,152 (multiples
    // of 64); 65,611 .. 65,718 -> 67,584 (multiples of 2,048).
    let expected: [(usize, [usize; 6]); 3] = [
        (64, [122, 512, 191, 512, 195, 512]),
        (1024, [1082, 1152, 1151, 1216, 1155, 1216]),
        (65_536, [65_594, 67_584, 65_663, 67_584, 65_667, 67_584]),
    ];
    println!();
    println!("bytes per message (payload; the 16-byte envelope id is the same in v1 and v2):");
    println!();
    println!("| plaintext | v1 chain | v2 chain | added | v1 prekey | v2 sealed prekey | added | v1 prekey, OPK | v2 sealed prekey, OPK | added |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (len, hand) in expected {
        let computed = [
            2 + 40 + len + 16,
            size_class(CHAIN_OVERHEAD + len + 1),
            111 + len + 16,
            size_class(sealed::SEALED_PREKEY_OVERHEAD + len + 1),
            115 + len + 16,
            size_class(sealed::SEALED_PREKEY_OVERHEAD_OPK + len + 1),
        ];
        assert_eq!(computed, hand, "size classes of {len} bytes");
        let plaintext = vec![0x61u8; len];
        // Real payloads: prekey messages (without and with a one-time
        // prekey), then chain messages of established sessions.
        let mut real = [0usize; 6];
        for (i, responder) in [(2, &bob_plain), (4, &bob)] {
            let mut v1 = Session::initiate(&mut rng, &alice, &responder.bundle, config).unwrap();
            real[i] = v1.encrypt(&mut rng, &plaintext).unwrap().len();
            let mut v2 =
                Session::initiate_sealed(&mut rng, &alice, &responder.bundle, config).unwrap();
            let m = v2.seal(&mut rng, &plaintext).unwrap();
            real[i + 1] = m.payload.len();
        }
        let (mut a1, _) = pair(&mut rng, false);
        real[0] = a1.encrypt(&mut rng, &plaintext).unwrap().len();
        let (mut a2, _) = pair(&mut rng, true);
        real[1] = a2.seal(&mut rng, &plaintext).unwrap().payload.len();
        assert_eq!(real, hand, "real payloads of {len} bytes");
        let kib = |n: usize| {
            if n >= 1024 {
                format!("{} KiB", n / 1024)
            } else {
                format!("{n} B")
            }
        };
        println!(
            "| {} | {} | {} | +{} | {} | {} | +{} | {} | {} | +{} |",
            kib(len),
            hand[0],
            hand[1],
            hand[1] - hand[0],
            hand[2],
            hand[3],
            hand[3] - hand[2],
            hand[4],
            hand[5],
            hand[5] - hand[4],
        );
    }
    println!();
}

// ---------------------------------------------------------------------------
// floor
// ---------------------------------------------------------------------------

fn floor(g: &mut Group<'_>) {
    let mut rng = rng();
    let secret = StaticSecret::from(random::<32>(&mut rng));
    let public = PublicKey::from(&StaticSecret::from(random::<32>(&mut rng)));
    g.bench_function("floor/x25519_keygen", |b| {
        b.iter(|| PublicKey::from(&StaticSecret::from(random::<32>(&mut rng))))
    });
    g.bench_function("floor/x25519_dh", |b| {
        b.iter(|| secret.diffie_hellman(black_box(&public)).to_bytes())
    });
    let verifying = SigningKey::from_bytes(&[7u8; 32]).verifying_key();
    let bytes = verifying.to_bytes();
    g.bench_function("floor/ed25519_decompress", |b| {
        b.iter(|| VerifyingKey::from_bytes(black_box(&bytes)).expect("valid key"))
    });
    g.bench_function("floor/ed25519_to_montgomery", |b| {
        b.iter(|| black_box(&verifying).to_montgomery().to_bytes())
    });

    let salt = [0x5au8; 32];
    let ikm = [0xa5u8; 128];
    let mut okm = [0u8; 64];
    for len in [44usize, 64] {
        g.bench_function(format!("floor/hkdf_sha256/{len}"), |b| {
            b.iter(|| {
                Hkdf::<Sha256>::new(Some(&salt), black_box(&ikm[..32]))
                    .expand(b"cubbyhole/v1 message", &mut okm[..len])
                    .expect("valid HKDF length");
                okm[0]
            })
        });
    }
    // The seal's HKDF: salt 0^32, info "cubbyhole/v2 seal" || E || SPK.
    let info = [0x17u8; 17 + 64];
    g.bench_function("floor/hkdf_sha256_seal/44", |b| {
        b.iter(|| {
            Hkdf::<Sha256>::new(Some(&[0u8; 32]), black_box(&ikm[..32]))
                .expand(&info, &mut okm[..44])
                .expect("valid HKDF length");
            okm[0]
        })
    });
    g.bench_function("floor/hkdf_sha256_ikm128/32", |b| {
        b.iter(|| {
            Hkdf::<Sha256>::new(Some(&salt), black_box(&ikm[..]))
                .expand(b"cubbyhole/v1 x3dh", &mut okm[..32])
                .expect("valid HKDF length");
            okm[0]
        })
    });

    let key = [0x42u8; 32];
    g.bench_function("floor/hmac_sha256_1B_pair", |b| {
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
    // hkey(HK, n): "cubbyhole/v2 header" || n, 23 bytes (tag: 20, HK: 23).
    g.bench_function("floor/hmac_sha256_23B", |b| {
        b.iter(|| {
            let mut mac =
                <Hmac<Sha256> as Mac>::new_from_slice(black_box(&key)).expect("any key length");
            mac.update(b"cubbyhole/v2 header");
            mac.update(&7u32.to_be_bytes());
            mac.finalize().into_bytes()
        })
    });

    let nonce = random::<12>(&mut rng);
    for (name, size, aad_len) in [
        ("aes256gcm", SMALL, BODY_AAD),
        ("aes256gcm", PREKEY_BODY, BODY_AAD),
        ("aes256gcm", CHAIN_BODY, BODY_AAD),
        ("aes256gcm_header", 40, 18),
        ("aes256gcm_inner", SEALED_INNER, 34),
    ] {
        let aad = vec![0x17u8; aad_len];
        let mut buf = vec![0x33u8; size];
        g.bench_function(format!("floor/{name}_seal/{size}"), |b| {
            b.iter(|| {
                Aes256Gcm::new(black_box(&key).into())
                    .encrypt_in_place_detached(Nonce::from_slice(&nonce), &aad, &mut buf)
                    .expect("short plaintext")
            })
        });
        let mut sealed = vec![0x33u8; size];
        let tag = Aes256Gcm::new((&key).into())
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), &aad, &mut sealed)
            .expect("short plaintext");
        g.bench_function(format!("floor/{name}_open/{size}"), |b| {
            b.iter_batched_ref(
                || sealed.clone(),
                |buf| {
                    Aes256Gcm::new(black_box(&key).into())
                        .decrypt_in_place_detached(Nonce::from_slice(&nonce), &aad, buf, &tag)
                        .expect("authentic")
                },
                BatchSize::SmallInput,
            )
        });
    }
}

// ---------------------------------------------------------------------------
// sessions
// ---------------------------------------------------------------------------

/// Bob's side: identity, prekeys, his verified bundle.
struct Responder {
    identity: IdentityKeyPair,
    prekeys: PrekeyStore,
    bundle: VerifiedBundle,
}

impl Responder {
    fn new(rng: &mut ChaCha20Rng, one_time_prekey: bool) -> Self {
        let identity = IdentityKeyPair::generate(rng);
        let mut prekeys = PrekeyStore::new(rng, &identity, NOW).expect("time in unix seconds");
        if one_time_prekey {
            prekeys.generate_one_time_prekeys(rng, 1);
        }
        let bundle = verify(&prekeys.bundle(&identity).encode());
        Responder {
            identity,
            prekeys,
            bundle,
        }
    }

    /// Accepts a first message, v1 wire or a v2 sealed prekey payload.
    fn accept(&self, payload: &[u8], v2: bool) -> Session {
        let inner;
        let bytes = if v2 {
            inner = self.prekeys.open_sealed(payload).expect("open_sealed");
            &inner[..]
        } else {
            payload
        };
        let incoming = Incoming::decode(bytes).expect("decode");
        Session::accept(
            &self.identity,
            &self.prekeys,
            &incoming,
            SessionConfig::default(),
        )
        .expect("accept")
        .session
    }
}

fn verify(bytes: &[u8]) -> VerifiedBundle {
    PrekeyBundle::decode(bytes)
        .and_then(|b| b.verify(NOW, FreshnessPolicy::default()))
        .expect("valid bundle")
}

fn send(s: &mut Session, rng: &mut ChaCha20Rng, plaintext: &[u8], v2: bool) -> Sealed {
    if v2 {
        s.seal(rng, plaintext).expect("seal")
    } else {
        Sealed {
            id: [0; 16],
            payload: s.encrypt(rng, plaintext).expect("encrypt"),
        }
    }
}

fn receive(s: &mut Session, m: &Sealed, v2: bool) -> Vec<u8> {
    if v2 {
        let mut out = Vec::new();
        s.open(&m.id, &m.payload, W, &mut out).expect("open");
        out
    } else {
        s.decrypt(&m.payload).expect("decrypt")
    }
}

/// Two sessions after A→B (prekey message), B→A, A→B, B→A, A→B: each side
/// has done DH ratchet steps, Alice has heard back, and Alice's next message
/// is the next one of Bob's current receiving chain (steady state).
fn pair(rng: &mut ChaCha20Rng, v2: bool) -> (Session, Session) {
    let (mut a, mut b) = established(rng, v2);
    let m = send(&mut a, rng, b"warm-up", v2);
    receive(&mut b, &m, v2);
    (a, b)
}

/// As in `benches/protocol.rs`: Alice has just received, so her next send
/// starts a new chain.
fn established(rng: &mut ChaCha20Rng, v2: bool) -> (Session, Session) {
    let bob = Responder::new(rng, false);
    let alice = IdentityKeyPair::generate(rng);
    let config = SessionConfig::default();
    let mut a = if v2 {
        Session::initiate_sealed(rng, &alice, &bob.bundle, config)
    } else {
        Session::initiate(rng, &alice, &bob.bundle, config)
    }
    .expect("initiate");
    let first = send(&mut a, rng, b"hello", v2);
    let mut b = bob.accept(&first.payload, v2);
    for _ in 0..2 {
        let m = send(&mut b, rng, b"ping", v2);
        receive(&mut a, &m, v2);
        let m = send(&mut a, rng, b"pong", v2);
        receive(&mut b, &m, v2);
    }
    let m = send(&mut b, rng, b"ping", v2);
    receive(&mut a, &m, v2);
    assert!(!a.sends_prekey_messages());
    assert_eq!(a.is_sealed(), v2);
    (a, b)
}

fn chain(g: &mut Group<'_>) {
    let mut rng = rng();
    let plaintext = [0x61u8; SMALL];
    for v2 in [false, true] {
        let (mut alice, bob) = pair(&mut rng, v2);
        let (name_send, name_receive) = if v2 {
            ("v2/seal/64", "v2/open/64")
        } else {
            ("v1/encrypt/64", "v1/decrypt/64")
        };
        let message = send(&mut alice, &mut rng, &plaintext, v2);
        if v2 {
            // The next message of Bob's current chain: the first tag Bob's
            // locate computes (n = Nr) is this one.
            assert_eq!(bob.routing_tags(W).first(), Some(&message.id));
            assert_eq!(bob.routing_tags(W).len(), W as usize, "no ratchet key pair");
        }
        g.bench_function(name_send, |b| {
            b.iter(|| send(&mut alice, &mut rng, black_box(&plaintext), v2))
        });
        g.bench_function(name_receive, |b| {
            b.iter_batched(
                || bob.clone(),
                |mut session| {
                    let out = receive(&mut session, black_box(&message), v2);
                    (session, out)
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.sample_size(30);
    for v2 in [false, true] {
        let (mut alice, mut bob) = established(&mut rng, v2);
        let name = if v2 { "v2/ping_pong" } else { "v1/ping_pong" };
        g.bench_function(name, |b| {
            b.iter(|| {
                let m = send(&mut alice, &mut rng, &plaintext, v2);
                receive(&mut bob, &m, v2);
                let m = send(&mut bob, &mut rng, &plaintext, v2);
                receive(&mut alice, &m, v2)
            })
        });
    }
    g.sample_size(100);
}

fn prekey(g: &mut Group<'_>) {
    let mut rng = rng();
    let plaintext = [0x61u8; SMALL];
    let bob = Responder::new(&mut rng, false);
    let alice = IdentityKeyPair::generate(&mut rng);
    let config = SessionConfig::default();
    for v2 in [false, true] {
        let initiated = if v2 {
            Session::initiate_sealed(&mut rng, &alice, &bob.bundle, config)
        } else {
            Session::initiate(&mut rng, &alice, &bob.bundle, config)
        }
        .expect("initiate");
        let message = send(&mut initiated.clone(), &mut rng, &plaintext, v2);
        let (name_send, name_accept) = if v2 {
            ("v2/prekey/seal/64", "v2/prekey/accept/64")
        } else {
            ("v1/prekey/encrypt/64", "v1/prekey/accept/64")
        };
        g.bench_function(name_send, |b| {
            b.iter_batched(
                || initiated.clone(),
                |mut session| {
                    let m = send(&mut session, &mut rng, black_box(&plaintext), v2);
                    (session, m)
                },
                BatchSize::SmallInput,
            )
        });
        // v2: accept of the inner message open_sealed returned (timed
        // separately, below).
        let inner = if v2 {
            bob.prekeys
                .open_sealed(&message.payload)
                .expect("open_sealed")
                .to_vec()
        } else {
            message.payload.clone()
        };
        g.bench_function(name_accept, |b| {
            b.iter(|| {
                let incoming = Incoming::decode(black_box(&inner)).expect("decode");
                Session::accept(&bob.identity, &bob.prekeys, &incoming, config).expect("accept")
            })
        });
    }

    // open_sealed with K signed prekeys held, sealed to the one tried last
    // (the store tries the current one, then the retained ones, oldest
    // first): K trials.
    let identity = IdentityKeyPair::generate(&mut rng);
    let mut store = PrekeyStore::new(&mut rng, &identity, NOW - 10).expect("prekeys");
    for k in 1..=3usize {
        if k > 1 {
            store
                .rotate_signed_prekey(&mut rng, &identity, NOW - 10 + k as u64)
                .expect("rotate");
        }
        assert_eq!(store.signed_prekeys().count(), k);
        let last = store.signed_prekeys().last().expect("held").id();
        let payload = sealed_to(&mut rng, &alice, &identity, &store, last);
        let (_, tried) =
            sealed::open_sealed_prekey(&payload, store.signed_prekeys()).expect("opens");
        assert_eq!(tried, k - 1, "sealed to the prekey tried last");
        g.bench_function(format!("v2/open_sealed/{k}"), |b| {
            b.iter(|| {
                sealed::open_sealed_prekey(black_box(&payload), store.signed_prekeys())
                    .expect("opens")
            })
        });
    }
}

/// A 64-byte sealed prekey message from `alice` to the signed prekey `id`
/// of `store` (a store holding only that prekey makes the bundle).
fn sealed_to(
    rng: &mut ChaCha20Rng,
    alice: &IdentityKeyPair,
    identity: &IdentityKeyPair,
    store: &PrekeyStore,
    id: u32,
) -> Vec<u8> {
    let spk = store
        .signed_prekeys()
        .find(|k| k.id() == id)
        .expect("held")
        .clone();
    let single = PrekeyStore::with_signed_prekey(spk);
    let bundle = verify(&single.bundle(identity).encode());
    let mut s =
        Session::initiate_sealed(rng, alice, &bundle, SessionConfig::default()).expect("initiate");
    s.seal(rng, &[0x61u8; SMALL]).expect("seal").payload
}

/// v1's fallback, one step: a session awaiting a new ratchet key tries a
/// message that starts a new chain of another session.
fn trial(g: &mut Group<'_>) {
    let mut rng = rng();
    let (_, bob) = established(&mut rng, false);
    let mut bob = bob;
    // Bob has received last; he replies, so he awaits a new ratchet key.
    bob.encrypt(&mut rng, b"reply").expect("encrypt");
    assert!(bob.awaits_new_ratchet_key());
    let (mut other_alice, _) = established(&mut rng, false);
    let foreign = other_alice
        .encrypt(&mut rng, &[0x61u8; SMALL])
        .expect("encrypt");
    assert!(bob.clone().decrypt(&foreign).is_err());
    g.bench_function("v1/trial_decrypt_fail", |b| {
        b.iter(|| {
            bob.decrypt(black_box(&foreign))
                .expect_err("not this session")
        })
    });
}

// ---------------------------------------------------------------------------
// routing
// ---------------------------------------------------------------------------

/// Bob with N sessions, the envelopes some peers sent him, and the index.
struct World {
    n: usize,
    sessions: Vec<Session>,
    /// (session index, an envelope that starts the peer's next chain).
    envelopes: Vec<(usize, Sealed)>,
    /// (tag, session index) of random sessions, for the lookup benches.
    probes: Vec<([u8; 16], usize)>,
    map: HashMap<[u8; 16], usize>,
    tags: usize,
    #[cfg(feature = "sqlite")]
    db: Db,
}

/// Bob's sessions, and (session index, envelope) of the targets.
type Built = (Vec<Session>, Vec<(usize, Sealed)>);

/// Builds Bob's `n` sessions on up to 4 threads (each session from its own
/// seeded generator, so the result does not depend on the threads).
fn build_sessions(n: usize) -> Built {
    let bob = Responder::new(&mut rng(), false);
    let targets = TARGETS.min(n);
    let is_target = |i: usize| (i * targets) % n < targets;
    let threads = std::thread::available_parallelism()
        .map_or(1, |p| p.get())
        .clamp(1, 4)
        .min(n);
    let config = SessionConfig::default();
    let parts: Vec<Built> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let bob = &bob;
                scope.spawn(move || {
                    let mut sessions = Vec::new();
                    let mut envelopes = Vec::new();
                    for i in (t * n / threads)..((t + 1) * n / threads) {
                        let mut rng = ChaCha20Rng::seed_from_u64(0x5ea1_0000_0000 + i as u64);
                        let peer = IdentityKeyPair::generate(&mut rng);
                        let mut a = Session::initiate_sealed(&mut rng, &peer, &bob.bundle, config)
                            .expect("initiate");
                        let first = a.seal(&mut rng, b"hello").expect("seal");
                        let mut b = bob.accept(&first.payload, true);
                        let reply = b.seal(&mut rng, b"hi").expect("seal");
                        if is_target(i) {
                            receive(&mut a, &reply, true);
                            let m = a.seal(&mut rng, &[0x61u8; SMALL]).expect("seal");
                            envelopes.push((i, m));
                        }
                        sessions.push(b);
                    }
                    (sessions, envelopes)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("builder thread"))
            .collect()
    });
    let mut sessions = Vec::with_capacity(n);
    let mut envelopes = Vec::new();
    for (s, e) in parts {
        sessions.extend(s);
        envelopes.extend(e);
    }
    assert_eq!(sessions.len(), n);
    assert_eq!(envelopes.len(), targets);
    (sessions, envelopes)
}

/// Resident memory of this process, bytes (Linux; 0 elsewhere).
fn rss() -> usize {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<usize>().ok())
        .map_or(0, |pages| pages * 4096)
}

impl World {
    fn build(n: usize) -> World {
        let started = Instant::now();
        let (sessions, envelopes) = build_sessions(n);
        let build_sessions = started.elapsed();

        let started = Instant::now();
        let rss_before = rss();
        let mut map: HashMap<[u8; 16], usize> = HashMap::new();
        let mut rng = rng();
        let mut probe_sessions: Vec<usize> = (0..PROBES)
            .map(|_| (rng.next_u64() % n as u64) as usize)
            .collect();
        probe_sessions.sort_unstable();
        let mut probes = Vec::with_capacity(PROBES);
        let mut next_probe = 0;
        let mut tags = 0;
        for (i, s) in sessions.iter().enumerate() {
            let expected = s.routing_tags(W);
            // 2W: the current chain's next W and the peer's next chain's W.
            assert_eq!(expected.len(), 2 * W as usize, "session {i}");
            tags += expected.len();
            while probe_sessions.get(next_probe) == Some(&i) {
                let pick = (rng.next_u32() % expected.len() as u32) as usize;
                probes.push((expected[pick], i));
                next_probe += 1;
            }
            for tag in expected {
                assert!(map.insert(tag, i).is_none(), "tags are distinct");
            }
        }
        let build_map = started.elapsed();
        let map_rss = rss().saturating_sub(rss_before);
        // hashbrown: a power of two of buckets, 7/8 of them usable (the
        // capacity), each an entry and a control byte (plus 16 control bytes).
        let buckets = (map.capacity() * 8 / 7).next_power_of_two();
        let entry = std::mem::size_of::<([u8; 16], usize)>();
        let map_bytes = buckets * (entry + 1) + 16;
        for (i, m) in &envelopes {
            assert_eq!(map.get(&m.id), Some(i), "the envelope's id is indexed");
        }
        println!(
            "routing world N = {n}: {n} sessions built in {:.1} s ({} threads; X3DH, sealed \
             prekey message, accept, reply each); {tags} tags ({} per session); hash map \
             built in {:.2} s: {} entries, capacity {}, {:.1} MiB by layout ({:.1} B per tag), \
             RSS +{:.1} MiB",
            build_sessions.as_secs_f64(),
            std::thread::available_parallelism()
                .map_or(1, |p| p.get())
                .clamp(1, 4)
                .min(n),
            tags / n,
            build_map.as_secs_f64(),
            map.len(),
            map.capacity(),
            map_bytes as f64 / 1048576.0,
            map_bytes as f64 / tags as f64,
            map_rss as f64 / 1048576.0,
        );
        #[cfg(feature = "sqlite")]
        let db = Db::build(n, &sessions);
        World {
            n,
            sessions,
            envelopes,
            probes,
            map,
            tags,
            #[cfg(feature = "sqlite")]
            db,
        }
    }
}

/// The SQLite index: `routes(key BLOB PRIMARY KEY, peer INTEGER) WITHOUT
/// ROWID` in a temporary file, as `src/storage/sqlite.rs` keeps `routes`
/// (there the key is joined by the peer's identity and device id).
#[cfg(feature = "sqlite")]
struct Db {
    path: PathBuf,
    conn: rusqlite::Connection,
}

#[cfg(feature = "sqlite")]
impl Db {
    fn open(path: &std::path::Path) -> rusqlite::Connection {
        let conn = rusqlite::Connection::open(path).expect("open");
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "wal", |r| r.get(0))
            .expect("wal");
        assert_eq!(mode, "wal");
        conn.pragma_update(None, "synchronous", "FULL")
            .expect("synchronous");
        conn
    }

    fn build(n: usize, sessions: &[Session]) -> Db {
        let path = std::env::temp_dir().join(format!(
            "cubbyhole-sealed-bench-{}-{n}.db",
            std::process::id()
        ));
        Db::remove(&path);
        let started = Instant::now();
        let mut conn = Db::open(&path);
        // A large cache while the rows go in (one transaction, in session
        // order: random keys, as a client inserts them).
        conn.pragma_update(None, "cache_size", -1_048_576)
            .expect("cache");
        conn.execute_batch(
            "CREATE TABLE routes (key BLOB PRIMARY KEY, peer INTEGER) WITHOUT ROWID",
        )
        .expect("create");
        let tx = conn.transaction().expect("begin");
        let mut rows = 0usize;
        {
            let mut insert = tx
                .prepare("INSERT INTO routes (key, peer) VALUES (?1, ?2)")
                .expect("prepare");
            for (i, s) in sessions.iter().enumerate() {
                for tag in s.routing_tags(W) {
                    insert.execute((&tag[..], i as i64)).expect("insert");
                    rows += 1;
                }
            }
        }
        tx.commit().expect("commit");
        conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
            .expect("checkpoint");
        drop(conn);
        let built = started.elapsed();
        let size = std::fs::metadata(&path).map_or(0, |m| m.len());
        // Reopened: SQLite's default page cache (2 MiB), as the store.
        let conn = Db::open(&path);
        let (pages, page_size): (i64, i64) = (
            conn.pragma_query_value(None, "page_count", |r| r.get(0))
                .expect("pages"),
            conn.pragma_query_value(None, "page_size", |r| r.get(0))
                .expect("page size"),
        );
        println!(
            "routing world N = {n}: SQLite routes built in {:.1} s: {rows} rows, {} pages of \
             {page_size} B, file {:.1} MiB ({:.1} B per row)",
            built.as_secs_f64(),
            pages,
            size as f64 / 1048576.0,
            size as f64 / rows as f64,
        );
        Db { path, conn }
    }

    fn lookup(&self, tag: &[u8; 16]) -> usize {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT peer FROM routes WHERE key = ?1")
            .expect("prepare");
        let peer: i64 = stmt.query_row([&tag[..]], |r| r.get(0)).expect("routed");
        peer as usize
    }

    fn remove(path: &std::path::Path) {
        for suffix in ["", "-wal", "-shm"] {
            let mut p = path.as_os_str().to_owned();
            p.push(suffix);
            let _ = std::fs::remove_file(PathBuf::from(p));
        }
    }
}

#[cfg(feature = "sqlite")]
impl Drop for Db {
    fn drop(&mut self) {
        Db::remove(&self.path);
    }
}

/// `routing/N/<index>/lookup` and `routing/N/<index>/envelope`.
fn index_benches(
    g: &mut Group<'_>,
    n: usize,
    name: &str,
    world: &OnceCell<World>,
    turn: &Cell<usize>,
    lookup: fn(&World, &[u8; 16]) -> usize,
) {
    let get = || world.get_or_init(|| World::build(n));
    g.bench_function(format!("routing/{n}/{name}/lookup"), |b| {
        let w = get();
        for (tag, i) in &w.probes {
            assert_eq!(lookup(w, tag), *i);
        }
        b.iter(|| {
            let k = turn.get();
            turn.set(k + 1);
            let (tag, _) = &w.probes[k % w.probes.len()];
            lookup(w, black_box(tag))
        })
    });
    g.bench_function(format!("routing/{n}/{name}/envelope"), |b| {
        let w = get();
        b.iter_batched(
            || {
                let k = turn.get();
                turn.set(k + 1);
                let (i, m) = &w.envelopes[k % w.envelopes.len()];
                (w.sessions[*i].clone(), *i, m)
            },
            |(mut session, i, m)| {
                let found = lookup(w, black_box(&m.id));
                assert_eq!(found, i);
                let mut out = Vec::new();
                session.open(&m.id, &m.payload, W, &mut out).expect("open");
                (session, out)
            },
            BatchSize::SmallInput,
        )
    });
}

fn routing(g: &mut Group<'_>) {
    for n in ROUTING_SIZES {
        if n > 1_000 && test_mode() {
            println!(
                "routing/{n}: skipped in --test mode (its setup takes about a minute); \
                 10 and 1,000 sessions run the same code"
            );
            continue;
        }
        // Built on first use (a filtered run that skips these builds nothing).
        let world: OnceCell<World> = OnceCell::new();
        let turn = Cell::new(0usize);
        index_benches(g, n, "hashmap", &world, &turn, |w, tag| {
            *w.map.get(tag).expect("routed")
        });
        #[cfg(feature = "sqlite")]
        index_benches(g, n, "sqlite", &world, &turn, |w, tag| w.db.lookup(tag));
        #[cfg(not(feature = "sqlite"))]
        println!("routing/{n}/sqlite: left out (build with --features sqlite)");
        if let Some(w) = world.get() {
            assert_eq!(w.n, n);
            assert_eq!(w.tags, w.map.len());
        }
    }
}

// ---------------------------------------------------------------------------
// report
// ---------------------------------------------------------------------------

const KG: &str = "x25519_keygen";
const DH: &str = "x25519_dh";
const DECOMPRESS: &str = "ed25519_decompress";
const MONT: &str = "ed25519_to_montgomery";
const HKDF44: &str = "hkdf_sha256/44";
const HKDF64: &str = "hkdf_sha256/64";
const HKDF_SEAL: &str = "hkdf_sha256_seal/44";
const HKDF_X3DH: &str = "hkdf_sha256_ikm128/32";
const KDF_CK: &str = "hmac_sha256_1B_pair";
const HMAC: &str = "hmac_sha256_23B";
const SEAL64: &str = "aes256gcm_seal/64";
const OPEN64: &str = "aes256gcm_open/64";
const SEAL335: &str = "aes256gcm_seal/335";
const OPEN335: &str = "aes256gcm_open/335";
const SEAL438: &str = "aes256gcm_seal/438";
const OPEN438: &str = "aes256gcm_open/438";
const SEAL_H: &str = "aes256gcm_header_seal/40";
const OPEN_H: &str = "aes256gcm_header_open/40";
const SEAL_P: &str = "aes256gcm_inner_seal/462";
const OPEN_P: &str = "aes256gcm_inner_open/462";

/// Each step's floor: (count, floor bench), read from `src/protocol/`.
const STEPS: &[(&str, &[(u32, &str)])] = &[
    ("v1/encrypt/64", &[(1, KDF_CK), (1, HKDF44), (1, SEAL64)]),
    // + tag and hkey, the header's AEAD; the body padded to 438 bytes.
    (
        "v2/seal/64",
        &[
            (1, KDF_CK),
            (1, HKDF44),
            (1, SEAL438),
            (2, HMAC),
            (1, SEAL_H),
        ],
    ),
    ("v1/decrypt/64", &[(1, KDF_CK), (1, HKDF44), (1, OPEN64)]),
    // + locate (1 tag: n = Nr, the first tried) and hkey, the header.
    (
        "v2/open/64",
        &[
            (1, KDF_CK),
            (1, HKDF44),
            (1, OPEN438),
            (2, HMAC),
            (1, OPEN_H),
        ],
    ),
    (
        "v1/ping_pong",
        &[
            (2, KG),
            (4, DH),
            (4, HKDF64),
            (4, KDF_CK),
            (4, HKDF44),
            (2, SEAL64),
            (2, OPEN64),
        ],
    ),
    // Per seal: HK of the new chain, tag, hkey (3 HMAC), SEAL_H. Per open:
    // locate (W tags of the current chain, HK(RK) and tag 0 of the next:
    // W + 2), hkey, HK(RK) of the new chain (2 more): 2 x (3 + 36) = 78.
    (
        "v2/ping_pong",
        &[
            (2, KG),
            (4, DH),
            (4, HKDF64),
            (4, KDF_CK),
            (4, HKDF44),
            (2, SEAL438),
            (2, OPEN438),
            (78, HMAC),
            (2, SEAL_H),
            (2, OPEN_H),
        ],
    ),
    (
        "v1/prekey/encrypt/64",
        &[(1, KDF_CK), (1, HKDF44), (1, SEAL64)],
    ),
    // + the seal: a fresh e (KG), DH(e, SPK), HKDF, AES-GCM of the inner.
    (
        "v2/prekey/seal/64",
        &[
            (1, KDF_CK),
            (1, HKDF44),
            (1, SEAL335),
            (1, KG),
            (1, DH),
            (1, HKDF_SEAL),
            (1, SEAL_P),
        ],
    ),
    ("v2/open_sealed/1", &[(1, DH), (1, HKDF_SEAL), (1, OPEN_P)]),
    ("v2/open_sealed/2", &[(2, DH), (2, HKDF_SEAL), (2, OPEN_P)]),
    ("v2/open_sealed/3", &[(3, DH), (3, HKDF_SEAL), (3, OPEN_P)]),
    (
        "v1/prekey/accept/64",
        &[
            (1, DECOMPRESS),
            (1, MONT),
            (4, DH),
            (1, HKDF_X3DH),
            (1, HKDF64),
            (1, KDF_CK),
            (1, HKDF44),
            (1, OPEN64),
        ],
    ),
    // + HK(RK) of the first receiving chain; the body padded to 335.
    (
        "v2/prekey/accept/64",
        &[
            (1, DECOMPRESS),
            (1, MONT),
            (4, DH),
            (1, HKDF_X3DH),
            (1, HKDF64),
            (1, KDF_CK),
            (1, HKDF44),
            (1, OPEN335),
            (1, HMAC),
        ],
    ),
    // Not a bench: the `Session::open` of a routed envelope (new chain):
    // locate (W + 2 HMAC: the current chain's W tags, HK(RK), tag 0),
    // hkey, HK(RK) of the new chain; the DH step; the body.
    (
        "open_new_chain",
        &[
            (1, DH),
            (1, HKDF64),
            (1, KDF_CK),
            (1, HKDF44),
            (1, OPEN438),
            (W + 4, HMAC),
            (1, OPEN_H),
        ],
    ),
    // The DH step is computed, then the AEAD fails (its tag check).
    (
        "v1/trial_decrypt_fail",
        &[(1, DH), (1, HKDF64), (1, KDF_CK), (1, HKDF44), (1, OPEN64)],
    ),
];

/// v2 beside v1: (what, v1 steps, v2 steps).
const PAIRS: &[(&str, &[&str], &[&str])] = &[
    ("chain message, send", &["v1/encrypt/64"], &["v2/seal/64"]),
    (
        "chain message, receive",
        &["v1/decrypt/64"],
        &["v2/open/64"],
    ),
    (
        "round trip with DH steps",
        &["v1/ping_pong"],
        &["v2/ping_pong"],
    ),
    (
        "prekey message, send",
        &["v1/prekey/encrypt/64"],
        &["v2/prekey/seal/64"],
    ),
    (
        "prekey message, receive",
        &["v1/prekey/accept/64"],
        &["v2/open_sealed/1", "v2/prekey/accept/64"],
    ),
    (
        "prekey message, both sides",
        &["v1/prekey/encrypt/64", "v1/prekey/accept/64"],
        &[
            "v2/prekey/seal/64",
            "v2/open_sealed/1",
            "v2/prekey/accept/64",
        ],
    ),
];

fn criterion_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(home);
    }
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("criterion")
}

/// The medians (ns) under `<root>/sealed`, by bench id without the group
/// (e.g. `floor/x25519_dh`); with `since`, only those written since.
fn medians(root: &Path, since: Option<SystemTime>) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    let mut stack = vec![root.join("sealed")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.file_name().and_then(|n| n.to_str()) != Some("estimates.json")
                || path
                    .parent()
                    .and_then(|p| p.file_name())
                    .and_then(|n| n.to_str())
                    != Some("new")
            {
                continue;
            }
            let fresh = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .is_ok_and(|t| since.is_none_or(|since| t >= since));
            let read = |p: PathBuf| -> Option<serde_json::Value> {
                serde_json::from_slice(&std::fs::read(p).ok()?).ok()
            };
            let (Some(estimates), Some(benchmark)) = (
                read(path.clone()),
                read(path.with_file_name("benchmark.json")),
            ) else {
                continue;
            };
            let id = benchmark["full_id"].as_str().unwrap_or_default();
            let median = estimates["median"]["point_estimate"].as_f64();
            if let (true, Some(id), Some(median)) = (fresh, id.strip_prefix("sealed/"), median) {
                out.insert(id.to_string(), median);
            }
        }
    }
    out
}

fn fmt_ns(ns: f64) -> String {
    if ns >= 1e9 {
        format!("{:.2} s", ns / 1e9)
    } else if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

/// The report from one run's medians, or from several passes' (each figure
/// the median of the passes' medians; the step table adds the range of the
/// per-pass ratios).
fn report(passes: &[HashMap<String, f64>]) {
    let mut m: HashMap<String, f64> = HashMap::new();
    for id in passes.iter().flat_map(|p| p.keys()) {
        let mut v: Vec<f64> = passes.iter().filter_map(|p| p.get(id).copied()).collect();
        v.sort_by(f64::total_cmp);
        let mid = v.len() / 2;
        let median = if v.len() % 2 == 1 {
            v[mid]
        } else {
            (v[mid - 1] + v[mid]) / 2.0
        };
        m.insert(id.clone(), median);
    }
    if m.is_empty() {
        return;
    }
    let floor_in = |m: &HashMap<String, f64>, step: &str| -> Option<f64> {
        let (_, terms) = STEPS.iter().find(|(id, _)| *id == step)?;
        terms
            .iter()
            .map(|(k, t)| m.get(&format!("floor/{t}")).map(|v| f64::from(*k) * v))
            .sum()
    };
    let floor_of = |step: &str| floor_in(&m, step);
    let range = |step: &str| -> String {
        let ratios: Vec<f64> = passes
            .iter()
            .filter_map(|p| Some(p.get(step)? / floor_in(p, step)?))
            .collect();
        if ratios.len() < 2 {
            return String::new();
        }
        let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = ratios.iter().copied().fold(0.0, f64::max);
        format!("{lo:.2}–{hi:.2}")
    };
    let terms = |step: &str| -> String {
        STEPS
            .iter()
            .find(|(id, _)| *id == step)
            .map(|(_, t)| {
                t.iter()
                    .map(|(k, t)| {
                        if *k == 1 {
                            t.to_string()
                        } else {
                            format!("{k} {t}")
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(" + ")
            })
            .unwrap_or_default()
    };
    println!(
        "\n## sealed: medians of {} pass(es), {} benches\n",
        passes.len(),
        m.len()
    );
    println!(
        "| step | median | floor | ratio | ratio range | floor terms |\n|---|---:|---:|---:|---:|---|"
    );
    for (id, _) in STEPS {
        let (Some(v), Some(f)) = (m.get(*id), floor_of(id)) else {
            continue;
        };
        println!(
            "| {id} | {} | {} | {:.2}x | {} | {} |",
            fmt_ns(*v),
            fmt_ns(f),
            v / f,
            range(id),
            terms(id)
        );
    }
    println!("\n| operation | v1 | v2 | v2 / v1 | v1 / floor | v2 / floor |\n|---|---:|---:|---:|---:|---:|");
    let sum = |ids: &[&str], f: &dyn Fn(&str) -> Option<f64>| -> Option<f64> {
        ids.iter().map(|id| f(id)).sum()
    };
    for (what, v1, v2) in PAIRS {
        let median = |id: &str| m.get(id).copied();
        let (Some(a), Some(b), Some(fa), Some(fb)) = (
            sum(v1, &median),
            sum(v2, &median),
            sum(v1, &floor_of),
            sum(v2, &floor_of),
        ) else {
            continue;
        };
        println!(
            "| {what} | {} | {} | {:.2}x | {:.2}x | {:.2}x |",
            fmt_ns(a),
            fmt_ns(b),
            b / a,
            a / fa,
            b / fb
        );
    }
    println!("\n| sessions | hash map lookup | SQLite lookup | lookup + open, hash map | lookup + open, SQLite | v1 trials, half / all awaiting (protocol only) |\n|---:|---:|---:|---:|---:|---:|");
    let trial = m.get("v1/trial_decrypt_fail").copied();
    for n in ROUTING_SIZES {
        let get = |k: &str| {
            m.get(&format!("routing/{n}/{k}"))
                .map_or("–".to_string(), |v| fmt_ns(*v))
        };
        if !m.keys().any(|k| k.starts_with(&format!("routing/{n}/"))) {
            continue;
        }
        let v1 = trial.map_or("–".to_string(), |t| {
            format!("{} / {}", fmt_ns(t * n as f64 / 2.0), fmt_ns(t * n as f64))
        });
        println!(
            "| {n} | {} | {} | {} | {} | {v1} |",
            get("hashmap/lookup"),
            get("sqlite/lookup"),
            get("hashmap/envelope"),
            get("sqlite/envelope"),
        );
    }
    if let Some(f) = floor_of("open_new_chain") {
        println!(
            "\nfloor of one `Session::open` of these envelopes (a new chain): {} ({})",
            fmt_ns(f),
            terms("open_new_chain")
        );
    }
}

// ---------------------------------------------------------------------------

fn main() {
    // SEALED_REPORT=DIR[:DIR...]: no run, the report of saved passes (each
    // DIR holds a copy of `<criterion dir>/sealed` as `DIR/sealed`).
    if let Some(dirs) = std::env::var_os("SEALED_REPORT") {
        let passes: Vec<_> = std::env::split_paths(&dirs)
            .map(|d| medians(&d, None))
            .collect();
        report(&passes);
        return;
    }
    let since = SystemTime::now();
    sizes();
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1000))
        .configure_from_args();
    {
        let mut g = c.benchmark_group("sealed");
        floor(&mut g);
        chain(&mut g);
        prekey(&mut g);
        trial(&mut g);
        routing(&mut g);
        g.finish();
    }
    c.final_summary();
    if !test_mode() {
        report(&[medians(&criterion_dir(), Some(since))]);
    }
}
