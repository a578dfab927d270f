//! Benchmarks in the browser, and the same code natively for the ratios
//! (BENCHMARKS.md). Ignored unless asked for, in both places:
//!
//! ```text
//! # in headless Chromium (from browser/; WASM_BINDGEN_TEST_TIMEOUT: the
//! # runner's default budget for a test binary is 20 s)
//! CHROMEDRIVER=/usr/bin/chromedriver WASM_BINDGEN_TEST_TIMEOUT=600 \
//!   cargo test --release -p cubbyhole-browser --target wasm32-unknown-unknown --test bench -- --include-ignored
//! # natively, the same figures
//! cargo test --release -p cubbyhole-browser --test bench -- --ignored --nocapture
//! ```
//!
//! Each figure is the median of several passes (the pass's total divided
//! by its operations), timed with `performance.now()` in the browser (its
//! resolution there is 0.1 ms or coarser, hence passes of many operations)
//! and `Instant` natively. What is timed:
//!
//! - `encrypt/v1`, `decrypt/v1`: a 64-byte message on an established
//!   session (no ratchet step: one sender's consecutive messages);
//!   `seal/v2`, `open/v2`: the same with profile v2 (sealed envelopes).
//! - `session/v1`, `session/v2`: a session's creation end to end: decode
//!   and verify the bundle, initiate, encrypt the first 64-byte message,
//!   and the receiver's accept of it (for v2: open the sealed envelope,
//!   then accept).
//! - `floor/x25519`, `floor/sha256 (86 B)`: the primitives under them (a
//!   session's creation is dominated by X25519 and Ed25519; a stamp try is
//!   one SHA-256 of 86 bytes), so each ratio reads against the ratio of
//!   its floor; `stamp/try`: one nonce of a stamp search (an identity
//!   stamp at the relay's default difficulty 24 takes 2^24 tries on
//!   average).
//! - `backlog/<store>`: a `Client` receiving a backlog of 1,000 64-byte
//!   messages (a first contact's) from an in-process relay into its store,
//!   until all are in its inbox (the set-up, publishing and sending, is not
//!   timed): `memory` is `MemoryStore`; `kv/indexeddb` is
//!   `KvStore<IdbBackend>` (in the browser: every store write sealed, one
//!   IndexedDB transaction with strict durability); `kv/memory` is
//!   `KvStore<MemoryKv>` (natively: the sealing and encoding without a
//!   disk); `sqlite file` is `SqliteStore` in a file (natively: the
//!   durable store IndexedDB stands in for).

use std::sync::Arc;

use cubbyhole::client::{Client, ClientConfig};
use cubbyhole::relay::{InProcessRelay, MemoryRelayStorage, Relay, RelayConfig};
use cubbyhole::storage::{MemoryStore, Store};
use cubbyhole::{
    FreshnessPolicy, IdentityKeyPair, Incoming, OsRng, PrekeyBundle, PrekeyStore, Sealed, Session,
    SessionConfig,
};

const NOW: u64 = 1_900_000_000;
const BODY: usize = 64;
const WINDOW: u32 = 32;
/// Messages per pass of the per-message figures.
const MESSAGES: usize = 2_000;
/// Sessions per pass of the session figures.
const SESSIONS: usize = 100;
/// Passes of each figure (its median is reported).
const PASSES: usize = 7;
/// The backlog's messages.
const BACKLOG: usize = 1_000;
/// Passes of the backlog figures.
const BACKLOG_PASSES: usize = 3;

#[cfg(target_arch = "wasm32")]
fn now_ms() -> f64 {
    use wasm_bindgen::JsCast;
    js_sys::Reflect::get(&js_sys::global(), &"performance".into())
        .expect("performance")
        .unchecked_into::<web_sys::Performance>()
        .now()
}

#[cfg(not(target_arch = "wasm32"))]
fn now_ms() -> f64 {
    use std::sync::OnceLock;
    use std::time::Instant;
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs_f64() * 1000.0
}

#[cfg(target_arch = "wasm32")]
const PLATFORM: &str = "wasm32 (headless Chromium)";
#[cfg(not(target_arch = "wasm32"))]
const PLATFORM: &str = "native";

fn report(name: &str, per_op_ms: &mut [f64], unit: &str) {
    per_op_ms.sort_by(f64::total_cmp);
    let median = per_op_ms[per_op_ms.len() / 2];
    let line = if unit == "us" {
        format!(
            "bench {PLATFORM}: {name}: {:.3} us (median of {} passes; min {:.3}, max {:.3})",
            median * 1000.0,
            per_op_ms.len(),
            per_op_ms[0] * 1000.0,
            per_op_ms[per_op_ms.len() - 1] * 1000.0
        )
    } else {
        format!(
            "bench {PLATFORM}: {name}: {median:.1} ms (median of {} passes; min {:.1}, max {:.1})",
            per_op_ms.len(),
            per_op_ms[0],
            per_op_ms[per_op_ms.len() - 1]
        )
    };
    #[cfg(target_arch = "wasm32")]
    web_sys::console::log_1(&line.into());
    #[cfg(not(target_arch = "wasm32"))]
    println!("{line}");
}

fn body(i: usize) -> [u8; BODY] {
    let mut b = [0x61u8; BODY];
    b[..4].copy_from_slice(&(i as u32).to_be_bytes());
    b
}

struct Bob {
    keys: IdentityKeyPair,
    prekeys: PrekeyStore,
    bundle: Vec<u8>,
}

fn bob() -> Bob {
    let keys = IdentityKeyPair::generate(&mut OsRng);
    let mut prekeys = PrekeyStore::new(&mut OsRng, &keys, NOW).expect("prekeys");
    prekeys.generate_one_time_prekeys(&mut OsRng, 1);
    let bundle = prekeys.bundle(&keys).encode();
    Bob {
        keys,
        prekeys,
        bundle,
    }
}

fn verify(bundle: &[u8]) -> cubbyhole::VerifiedBundle {
    PrekeyBundle::decode(bundle)
        .expect("decode")
        .verify(NOW, FreshnessPolicy::default())
        .expect("verify")
}

/// Bob's accept of a first message (sealed for v2).
fn accept(bob: &mut PrekeyStore, keys: &IdentityKeyPair, first: &[u8], v2: bool) -> Session {
    let inner;
    let message = if v2 {
        inner = bob.open_sealed(first).expect("open_sealed");
        &inner[..]
    } else {
        first
    };
    let incoming = Incoming::decode(message).expect("decode");
    let accepted = bob
        .accept(keys, &incoming, SessionConfig::default())
        .expect("accept");
    assert_eq!(accepted.plaintext.len(), BODY);
    accepted.session
}

/// Alice's first message (the payload of a sealed one for v2).
fn first(alice: &mut Session, v2: bool) -> Vec<u8> {
    if v2 {
        alice.seal(&mut OsRng, &body(0)).expect("seal").payload
    } else {
        alice.encrypt(&mut OsRng, &body(0)).expect("encrypt")
    }
}

fn initiate(alice: &IdentityKeyPair, bundle: &[u8], v2: bool) -> Session {
    let bundle = verify(bundle);
    if v2 {
        Session::initiate_sealed(&mut OsRng, alice, &bundle, SessionConfig::default())
    } else {
        Session::initiate(&mut OsRng, alice, &bundle, SessionConfig::default())
    }
    .expect("initiate")
}

/// An established pair (Bob replied once, Alice read it), Alice sending.
fn established(v2: bool) -> (Session, Session) {
    let mut b = bob();
    let alice = IdentityKeyPair::generate(&mut OsRng);
    let mut a = initiate(&alice, &b.bundle, v2);
    let m = first(&mut a, v2);
    let mut bs = accept(&mut b.prekeys, &b.keys, &m, v2);
    if v2 {
        let reply = bs.seal(&mut OsRng, b"reply").expect("seal");
        let mut out = Vec::new();
        a.open(&reply.id, &reply.payload, WINDOW, &mut out)
            .expect("open");
    } else {
        let reply = bs.encrypt(&mut OsRng, b"reply").expect("encrypt");
        a.decrypt(&reply).expect("decrypt");
    }
    (a, bs)
}

fn messages() {
    for v2 in [false, true] {
        let (mut a, mut b) = established(v2);
        let (mut send, mut receive) = (Vec::new(), Vec::new());
        let plain = body(1);
        for _ in 0..PASSES {
            let start = now_ms();
            let wires: Vec<Result<Vec<u8>, Sealed>> = if v2 {
                (0..MESSAGES)
                    .map(|_| Err(a.seal(&mut OsRng, &plain).expect("seal")))
                    .collect()
            } else {
                (0..MESSAGES)
                    .map(|_| Ok(a.encrypt(&mut OsRng, &plain).expect("encrypt")))
                    .collect()
            };
            let sent = now_ms();
            let mut out = Vec::with_capacity(BODY);
            for w in &wires {
                out.clear();
                match w {
                    Ok(wire) => out = b.decrypt(wire).expect("decrypt"),
                    Err(m) => b.open(&m.id, &m.payload, WINDOW, &mut out).expect("open"),
                }
            }
            let received = now_ms();
            assert_eq!(out, plain);
            send.push((sent - start) / MESSAGES as f64);
            receive.push((received - sent) / MESSAGES as f64);
        }
        let (s, r) = if v2 {
            ("seal/v2 (64 B)", "open/v2 (64 B)")
        } else {
            ("encrypt/v1 (64 B)", "decrypt/v1 (64 B)")
        };
        report(s, &mut send, "us");
        report(r, &mut receive, "us");
    }
}

fn floors() {
    use sha2::{Digest, Sha256};
    use x25519_dalek::{PublicKey, StaticSecret};
    const DH: usize = 200;
    const HASHES: usize = 20_000;
    let secret = StaticSecret::random_from_rng(OsRng);
    let mut public = PublicKey::from(&StaticSecret::random_from_rng(OsRng));
    let (mut dh, mut sha, mut tries) = (Vec::new(), Vec::new(), Vec::new());
    let mailbox = cubbyhole::transport::MailboxId([7; 32]);
    let id = cubbyhole::transport::EnvelopeId([9; 16]);
    for _ in 0..PASSES {
        let start = now_ms();
        for _ in 0..DH {
            // Chained, so no call can be skipped.
            public = PublicKey::from(secret.diffie_hellman(&public).to_bytes());
        }
        let dh_done = now_ms();
        let mut input = [0x5au8; 86];
        for _ in 0..HASHES {
            let digest = Sha256::digest(input);
            input[..32].copy_from_slice(&digest);
        }
        let sha_done = now_ms();
        let r = cubbyhole::transport::stamp::Stamp::mint(
            &mailbox,
            &id,
            64,
            64,
            NOW,
            u64::from(input[0]),
            HASHES as u64,
        )
        .expect("64 bits is the ceiling");
        assert!(r.is_err(), "no 64-bit stamp in {HASHES} tries");
        let stamp_done = now_ms();
        dh.push((dh_done - start) / DH as f64);
        sha.push((sha_done - dh_done) / HASHES as f64);
        tries.push((stamp_done - sha_done) / HASHES as f64);
    }
    report("floor/x25519", &mut dh, "us");
    report("floor/sha256 (86 B)", &mut sha, "us");
    report("stamp/try", &mut tries, "us");
}

fn sessions() {
    for v2 in [false, true] {
        let b = bob();
        let alice = IdentityKeyPair::generate(&mut OsRng);
        let mut per = Vec::new();
        for _ in 0..PASSES {
            // Each creation on its own copy of Bob's prekeys (a copy made
            // outside the timing): every accept then finds the one-time
            // prekey and an empty replay memory, as a first contact does.
            let mut stores: Vec<PrekeyStore> = (0..SESSIONS).map(|_| b.prekeys.clone()).collect();
            let start = now_ms();
            for store in &mut stores {
                let mut a = initiate(&alice, &b.bundle, v2);
                let m = first(&mut a, v2);
                let _ = accept(store, &b.keys, &m, v2);
            }
            per.push((now_ms() - start) / SESSIONS as f64);
        }
        let name = if v2 {
            "session/v2 (verify + initiate + first message + accept)"
        } else {
            "session/v1 (verify + initiate + first message + accept)"
        };
        report(name, &mut per, "us");
    }
}

type InProcess = InProcessRelay<MemoryRelayStorage>;

/// Alice sends Bob (on `store`) the backlog through a fresh in-process
/// relay; returns Bob, offline until the timed receive.
async fn backlog<S: Store>(store: S) -> Client<S, InProcess, InProcess> {
    let relay_config = RelayConfig {
        max_pending_envelopes: 2 * BACKLOG as u32,
        max_stranger_envelopes: 2 * BACKLOG as u32,
        max_stranger_bytes: RelayConfig::DEFAULT_MAX_PENDING_BYTES,
        ..RelayConfig::unpriced()
    };
    let relay = InProcessRelay::with_clock(
        Relay::new(MemoryRelayStorage::new(), relay_config),
        Arc::new(|| NOW),
    );
    let config = ClientConfig::default();
    let mut bob = Client::open(store, relay.clone(), relay.clone(), config, &mut OsRng)
        .await
        .expect("bob");
    let mut alice = Client::open(
        MemoryStore::new(),
        relay.clone(),
        relay.clone(),
        config,
        &mut OsRng,
    )
    .await
    .expect("alice");
    assert!(bob.maintain_prekeys(&mut OsRng, NOW).await.expect("bob"));
    alice
        .maintain_prekeys(&mut OsRng, NOW)
        .await
        .expect("alice");
    let to = bob.address();
    for i in 0..BACKLOG {
        let sent = alice
            .send(&mut OsRng, &to, &body(i), NOW)
            .await
            .expect("send");
        assert!(sent.deposited);
    }
    bob
}

/// The timed part: receive until the whole backlog is in the inbox;
/// milliseconds.
async fn receive_all<S: Store>(bob: &mut Client<S, InProcess, InProcess>) -> f64 {
    let start = now_ms();
    let mut received = 0;
    while received < BACKLOG {
        let report = bob.receive(&mut OsRng, NOW).await.expect("receive");
        assert!(report.rejected.is_empty(), "{:?}", report.rejected);
        assert!(report.received > 0, "no progress");
        received += report.received;
    }
    let elapsed = now_ms() - start;
    assert_eq!(received, BACKLOG);
    assert_eq!(bob.inbox().await.expect("inbox").len(), BACKLOG);
    elapsed
}

async fn backlog_memory() {
    let mut per = Vec::new();
    for _ in 0..BACKLOG_PASSES {
        let mut bob = backlog(MemoryStore::new()).await;
        per.push(receive_all(&mut bob).await);
    }
    report("backlog/memory (1,000 messages)", &mut per, "ms");
}

/// The store's key in the `kv` backlogs.
const STORE_KEY: [u8; 32] = [0x4b; 32];

#[cfg(target_arch = "wasm32")]
async fn backlog_kv() {
    use cubbyhole::storage::KvStore;
    use cubbyhole_browser::{delete_database, IdbBackend};
    let mut per = Vec::new();
    for pass in 0..BACKLOG_PASSES {
        let name = format!(
            "bench-backlog-{pass}-{}",
            (js_sys::Math::random() * 1e15) as u64
        );
        let backend = IdbBackend::open(&name).await.expect("open");
        let store = KvStore::open(backend, &STORE_KEY).await.expect("KvStore");
        let mut bob = backlog(store).await;
        per.push(receive_all(&mut bob).await);
        drop(bob);
        delete_database(&name).await.expect("delete");
    }
    report("backlog/kv/indexeddb (1,000 messages)", &mut per, "ms");
}

#[cfg(not(target_arch = "wasm32"))]
async fn backlog_kv() {
    use cubbyhole::storage::kv::MemoryKv;
    use cubbyhole::storage::KvStore;
    let mut per = Vec::new();
    for _ in 0..BACKLOG_PASSES {
        let store = KvStore::open(MemoryKv::new(), &STORE_KEY)
            .await
            .expect("KvStore");
        let mut bob = backlog(store).await;
        per.push(receive_all(&mut bob).await);
    }
    report("backlog/kv/memory (1,000 messages)", &mut per, "ms");
}

/// Natively, the same backlog into the SQLite store in a file (every
/// commit synced: `synchronous=FULL`), the native counterpart of
/// IndexedDB with strict durability.
#[cfg(not(target_arch = "wasm32"))]
async fn backlog_sqlite() {
    use cubbyhole::storage::SqliteStore;
    let mut per = Vec::new();
    for pass in 0..BACKLOG_PASSES {
        let path = std::env::temp_dir().join(format!(
            "cubbyhole-bench-backlog-{}-{pass}.db",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        let store = SqliteStore::open(&path, &STORE_KEY).expect("SqliteStore");
        let mut bob = backlog(store).await;
        per.push(receive_all(&mut bob).await);
        drop(bob);
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }
    report("backlog/sqlite file (1,000 messages)", &mut per, "ms");
}

#[cfg(target_arch = "wasm32")]
mod browser {
    use wasm_bindgen_test::*;

    wasm_bindgen_test_configure!(run_in_browser);

    #[wasm_bindgen_test]
    #[ignore = "a benchmark: run with -- --include-ignored (and --release)"]
    fn floors() {
        super::floors();
    }

    #[wasm_bindgen_test]
    #[ignore = "a benchmark: run with -- --include-ignored (and --release)"]
    fn messages() {
        super::messages();
    }

    #[wasm_bindgen_test]
    #[ignore = "a benchmark: run with -- --include-ignored (and --release)"]
    fn sessions() {
        super::sessions();
    }

    #[wasm_bindgen_test]
    #[ignore = "a benchmark: run with -- --include-ignored (and --release)"]
    async fn backlog_memory() {
        super::backlog_memory().await;
    }

    #[wasm_bindgen_test]
    #[ignore = "a benchmark: run with -- --include-ignored (and --release)"]
    async fn backlog_indexeddb() {
        super::backlog_kv().await;
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod native {
    use cubbyhole::client::block_on;

    #[test]
    #[ignore = "a benchmark: run with --release -- --ignored --nocapture"]
    fn floors() {
        super::floors();
    }

    #[test]
    #[ignore = "a benchmark: run with --release -- --ignored --nocapture"]
    fn messages() {
        super::messages();
    }

    #[test]
    #[ignore = "a benchmark: run with --release -- --ignored --nocapture"]
    fn sessions() {
        super::sessions();
    }

    #[test]
    #[ignore = "a benchmark: run with --release -- --ignored --nocapture"]
    fn backlog_memory() {
        block_on(super::backlog_memory());
    }

    #[test]
    #[ignore = "a benchmark: run with --release -- --ignored --nocapture"]
    fn backlog_sqlite() {
        block_on(super::backlog_sqlite());
    }

    #[test]
    #[ignore = "a benchmark: run with --release -- --ignored --nocapture"]
    fn backlog_kv_memory() {
        block_on(super::backlog_kv());
    }
}
