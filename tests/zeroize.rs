//! Secrets are zeroized when they are dropped: no heap block freed while a
//! secret-bearing value drops still holds a secret of it.
//!
//! A global allocator wrapper (this test binary only; the crate itself
//! forbids `unsafe`) scans every block freed on the current thread while a
//! scan is armed, before handing it to the system allocator, for the two
//! 16-byte halves of each known secret (a half catches a copy cut in two as
//! well as a whole one). Each value is built from known secret bytes (a
//! seeded RNG; the secret bytes read back through the public exports:
//! `seed`, `secret_bytes`, the documented `to_bytes` layouts), put in a
//! `Box` when it would otherwise live on the stack, and dropped under the
//! scan.
//!
//! A scan that cannot see anything would pass every test, so each test has
//! a control (`build_holding`): the heap blocks allocated while the value
//! was built, and still live, must show its secrets before it drops. What
//! the scan cannot see: stack copies (moves) and memory the Rust allocator
//! never handles (SQLite's own allocations go to `malloc` directly).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::RefCell;

use cubbyhole::bundle::FreshnessPolicy;
use cubbyhole::hazmat;
#[cfg(feature = "sqlite")]
use cubbyhole::storage::{BlockingStore, SqliteStore};
use cubbyhole::storage::{LocalIdentity, PrekeyState, Quarantined, SessionEntry, SessionRecord};
use cubbyhole::transport::DeviceAddress;
use cubbyhole::{
    IdentityKeyPair, Incoming, OneTimePrekey, PrekeyBundle, PrekeyStore, Session, SessionConfig,
    SignedPrekey,
};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
#[cfg(feature = "sqlite")]
use sha2::Sha256;
use sha2::{Digest, Sha512};

const NOW: u64 = 1_800_000_000;

// ---------------------------------------------------------------------------
// The scanning allocator.

/// One needle half found in a freed block.
#[derive(Clone, Copy, Debug)]
struct Hit {
    needle: usize,
    half: usize,
    block_len: usize,
    offset: usize,
}

/// The armed scan of the current thread.
struct Scan {
    /// `(first 8 bytes as u64, the 16-byte half, needle index, half index)`,
    /// sorted by the first field.
    halves: Vec<(u64, [u8; 16], usize, usize)>,
    /// Pre-allocated: pushing never allocates (the hook must not).
    hits: Vec<Hit>,
    /// Hits beyond `hits`' capacity.
    lost: usize,
    /// While a value is built: the blocks allocated and not yet freed,
    /// `(address, size)` (pre-allocated, as `hits`).
    live: Vec<(usize, usize)>,
}

thread_local! {
    static SCAN: RefCell<Option<Scan>> = const { RefCell::new(None) };
}

struct Scanning;

impl Scan {
    fn allocated(&mut self, ptr: *mut u8, size: usize) {
        if !ptr.is_null() && self.live.len() < self.live.capacity() {
            self.live.push((ptr as usize, size));
        }
    }
    fn freed(&mut self, ptr: *mut u8) {
        if let Some(i) = self.live.iter().position(|b| b.0 == ptr as usize) {
            self.live.swap_remove(i);
        }
    }
}

/// Scans `len` bytes at `ptr`, from offset `from`, and records the hits.
///
/// # Safety
/// `ptr..ptr + len` must be one block the allocator owns and that nothing
/// writes while it is read. Its bytes are read as `u8` whatever they hold
/// (padding and spare capacity included): this relies on the platform, not
/// on Rust's abstract machine, and only compares them.
unsafe fn scan_block(scan: &mut Scan, ptr: *const u8, len: usize, from: usize) {
    if len < 16 {
        return;
    }
    for offset in from..=len - 16 {
        // SAFETY: offset + 16 <= len, inside the block (caller's contract).
        let window: [u8; 16] = unsafe { std::ptr::read_unaligned(ptr.add(offset).cast()) };
        let key = u64::from_ne_bytes(window[..8].try_into().unwrap());
        let start = scan.halves.partition_point(|h| h.0 < key);
        for &(k, half, needle, which) in &scan.halves[start..] {
            if k != key {
                break;
            }
            if half == window {
                if scan.hits.len() < scan.hits.capacity() {
                    scan.hits.push(Hit {
                        needle,
                        half: which,
                        block_len: len,
                        offset,
                    });
                } else {
                    scan.lost += 1;
                }
            }
        }
    }
}

/// Runs `f` on the current thread's armed scan, if any and if the hook is
/// not already inside it (a nested call finds it borrowed and does nothing).
fn with_scan(f: impl FnOnce(&mut Scan)) {
    let _ = SCAN.try_with(|cell| {
        if let Ok(mut guard) = cell.try_borrow_mut() {
            if let Some(scan) = guard.as_mut() {
                f(scan);
            }
        }
    });
}

// SAFETY: every call is forwarded unchanged to the system allocator. Before
// a block goes back (dealloc, or realloc moving it), the hook only reads it;
// it never allocates (hits go into pre-allocated capacity).
unsafe impl GlobalAlloc for Scanning {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        with_scan(|scan| scan.allocated(ptr, layout.size()));
        ptr
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc_zeroed(layout) };
        with_scan(|scan| scan.allocated(ptr, layout.size()));
        ptr
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        with_scan(|scan| {
            scan.freed(ptr);
            // SAFETY: the block is still ours until System.dealloc below.
            unsafe { scan_block(scan, ptr, layout.size(), 0) }
        });
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // The old block is scanned before it may be freed; its hits count
        // only if it was: moved, or (in place) shrunk below them.
        let mut before = None;
        with_scan(|scan| {
            before = Some(scan.hits.len());
            // SAFETY: the block is still ours until System.realloc below.
            unsafe { scan_block(scan, ptr, layout.size(), 0) };
        });
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            with_scan(|scan| {
                scan.freed(ptr);
                scan.allocated(new, new_size);
            });
        }
        if let Some(before) = before {
            if new == ptr || new.is_null() {
                with_scan(|scan| {
                    let mut i = before;
                    while i < scan.hits.len() {
                        if new.is_null() || scan.hits[i].offset + 16 <= new_size {
                            scan.hits.swap_remove(i);
                        } else {
                            i += 1;
                        }
                    }
                });
            }
        }
        new
    }
}

#[global_allocator]
static GLOBAL: Scanning = Scanning;

// ---------------------------------------------------------------------------
// Test helpers.

/// Named 32-byte secrets to look for. The test's own copies must not show
/// up in the scan: their buffer never grows (room is reserved up front)
/// and is wiped when dropped.
struct Secrets {
    names: Vec<String>,
    values: zeroize::Zeroizing<Vec<[u8; 32]>>,
}

const MAX_NEEDLES: usize = 512;

impl Default for Secrets {
    fn default() -> Self {
        Secrets {
            names: Vec::new(),
            values: zeroize::Zeroizing::new(Vec::with_capacity(MAX_NEEDLES)),
        }
    }
}

impl Secrets {
    fn add(&mut self, name: impl Into<String>, value: &[u8; 32]) {
        assert_ne!(value, &[0u8; 32], "a zero needle finds zeroized memory");
        assert!(self.values.len() < MAX_NEEDLES, "raise MAX_NEEDLES");
        self.names.push(name.into());
        self.values.push(*value);
    }

    fn extend(&mut self, other: Secrets) {
        for (n, v) in other.names.into_iter().zip(other.values.iter()) {
            self.add(n, v);
        }
    }

    fn len(&self) -> usize {
        self.values.len()
    }
}

/// The needles' halves, sorted for [`scan_block`].
fn halves(secrets: &Secrets) -> Vec<(u64, [u8; 16], usize, usize)> {
    let mut halves = Vec::with_capacity(secrets.len() * 2);
    for (i, v) in secrets.values.iter().enumerate() {
        for (h, half) in v.chunks_exact(16).enumerate() {
            let half: [u8; 16] = half.try_into().unwrap();
            let key = u64::from_ne_bytes(half[..8].try_into().unwrap());
            halves.push((key, half, i, h));
        }
    }
    halves.sort_by_key(|h| h.0);
    halves
}

/// Disarms the scan when dropped (also on a panic inside the armed part).
struct Armed;

impl Drop for Armed {
    fn drop(&mut self) {
        let scan = SCAN.with(|cell| cell.borrow_mut().take());
        drop(scan);
    }
}

/// Runs `f` with the scan armed for `secrets`; returns what `f` returned
/// and a description of every secret half found in a block freed meanwhile.
fn freed_secrets<R>(secrets: &Secrets, f: impl FnOnce() -> R) -> (R, Vec<String>) {
    let halves = halves(secrets);
    SCAN.with(|cell| {
        *cell.borrow_mut() = Some(Scan {
            halves,
            hits: Vec::with_capacity(4096),
            lost: 0,
            live: Vec::with_capacity(1 << 16),
        })
    });
    let armed = Armed;
    let out = f();
    let scan = SCAN.with(|cell| cell.borrow_mut().take()).unwrap();
    drop(armed);
    (out, describe(secrets, &scan))
}

fn describe(secrets: &Secrets, scan: &Scan) -> Vec<String> {
    let mut found: Vec<String> = scan
        .hits
        .iter()
        .map(|h| {
            format!(
                "{} ({} half) in a freed block of {} bytes at offset {}",
                secrets.names[h.needle],
                ["first", "second"][h.half],
                h.block_len,
                h.offset
            )
        })
        .collect();
    if scan.lost > 0 {
        found.push(format!("... and {} more", scan.lost));
    }
    found
}

/// Asserts that dropping `value` frees no block holding one of `secrets`.
fn assert_drop_wipes<T>(what: &str, secrets: &Secrets, value: T) {
    let ((), found) = freed_secrets(secrets, || drop(value));
    assert!(
        found.is_empty(),
        "dropping {what} left secrets in freed memory:\n  {}",
        found.join("\n  ")
    );
}

/// The control: builds a value and returns the secrets seen in the heap
/// blocks allocated while it was built and still live (its own blocks, and
/// perhaps others'). The scan must see every secret there, or a test that
/// finds none when the value drops proves nothing.
fn build_holding<T>(secrets: &Secrets, names: &[&str], build: impl FnOnce() -> T) -> T {
    let ((value, live), _) = freed_secrets(secrets, || {
        let value = build();
        // (The clone's own allocation is not tracked: the scan is borrowed.)
        let live = SCAN.with(|cell| cell.borrow().as_ref().unwrap().live.clone());
        (value, live)
    });
    let mut scan = Scan {
        halves: halves(secrets),
        hits: Vec::with_capacity(4096),
        lost: 0,
        live: Vec::new(),
    };
    for &(ptr, size) in &live {
        // SAFETY: each block was allocated while `value` was built and not
        // freed since (the scan is disarmed now: nothing is freed while
        // this loop reads); `value` is not used meanwhile.
        unsafe { scan_block(&mut scan, ptr as *const u8, size, 0) };
    }
    let found = describe(secrets, &scan);
    for name in names {
        for half in ["first", "second"] {
            assert!(
                found
                    .iter()
                    .any(|f| f.starts_with(&format!("{name} ({half} half)"))),
                "control: {name} ({half} half) not seen in the memory of the value built \
                 (the scan or the needle is wrong); seen: {found:?}"
            );
        }
    }
    value
}

fn rng(seed: u64) -> ChaCha20Rng {
    ChaCha20Rng::seed_from_u64(seed)
}

fn random32(rng: &mut ChaCha20Rng) -> [u8; 32] {
    let mut out = [0u8; 32];
    rng.fill_bytes(&mut out);
    out
}

/// The X25519 form of an identity seed (SPEC: the clamped first half of
/// SHA-512(seed)), computed here with sha2 directly.
fn identity_x25519_scalar(seed: &[u8; 32]) -> [u8; 32] {
    let hash = Sha512::digest(seed);
    let mut scalar: [u8; 32] = hash[..32].try_into().unwrap();
    scalar[0] &= 248;
    scalar[31] &= 127;
    scalar[31] |= 64;
    scalar
}

fn identity_secrets(name: &str, seed: &[u8; 32]) -> Secrets {
    let mut s = Secrets::default();
    s.add(format!("{name} seed"), seed);
    s.add(
        format!("{name} X25519 scalar"),
        &identity_x25519_scalar(seed),
    );
    s
}

/// The secret keys of a session state, read from its documented layout
/// (src/protocol/state.rs, SPEC.md "Session state"): root key, our ratchet
/// secret, the chain keys and every skipped message key.
fn session_secrets(name: &str, state: &[u8]) -> Secrets {
    fn take<'a>(r: &mut &'a [u8], n: usize) -> &'a [u8] {
        let (head, tail) = r.split_at(n);
        *r = tail;
        head
    }
    fn key(r: &mut &[u8]) -> [u8; 32] {
        take(r, 32).try_into().unwrap()
    }
    fn u32_(r: &mut &[u8]) -> u32 {
        u32::from_be_bytes(take(r, 4).try_into().unwrap())
    }
    let mut s = Secrets::default();
    let mut r = state;
    assert_eq!(take(&mut r, 1), [2], "state version");
    let flags = take(&mut r, 1)[0];
    if flags & 8 != 0 {
        take(&mut r, 32 + 4);
        if flags & 16 != 0 {
            take(&mut r, 4);
        }
    }
    if flags & 1 != 0 {
        take(&mut r, 16);
    }
    s.add(format!("{name} root key"), &key(&mut r));
    if flags & 32 != 0 {
        s.add(format!("{name} ratchet secret"), &key(&mut r));
    }
    take(&mut r, 32);
    if flags & 2 != 0 {
        s.add(format!("{name} sending chain key"), &key(&mut r));
    }
    take(&mut r, 8);
    if flags & 4 != 0 {
        s.add(format!("{name} receiving chain key"), &key(&mut r));
    }
    take(&mut r, 4);
    if flags & 64 != 0 {
        take(&mut r, 8);
    }
    if flags & 128 != 0 {
        let chains = u32_(&mut r);
        for c in 0..chains {
            take(&mut r, 32);
            let keys = u32_(&mut r);
            for _ in 0..keys {
                let n = u32_(&mut r);
                s.add(format!("{name} skipped key {c}/{n}"), &key(&mut r));
            }
        }
    }
    assert!(r.is_empty(), "state layout: {} bytes left", r.len());
    s
}

/// Alice's session to Bob and Bob's to Alice, past the prekey messages,
/// with skipped message keys on Bob's side (in the current chain and an
/// older one); also the secrets of every state each went through.
fn established(rng: &mut ChaCha20Rng) -> (Session, Session, Secrets) {
    let alice = IdentityKeyPair::from_seed(&random32(rng));
    let bob = IdentityKeyPair::from_seed(&random32(rng));
    let mut prekeys = PrekeyStore::new(rng, &bob, NOW).unwrap();
    prekeys.generate_one_time_prekeys(rng, 1);
    let bundle = PrekeyBundle::decode(&prekeys.bundle(&bob).encode())
        .unwrap()
        .verify(NOW, FreshnessPolicy::default())
        .unwrap();
    let mut history = Secrets::default();
    let mut a = Session::initiate(rng, &alice, &bundle, SessionConfig::default()).unwrap();
    history.extend(session_secrets("alice@0", &a.to_bytes()));
    let first = a.encrypt(rng, b"hello").unwrap();
    let mut b = prekeys
        .accept(
            &bob,
            &Incoming::decode(&first).unwrap(),
            SessionConfig::default(),
        )
        .unwrap()
        .session;
    history.extend(session_secrets("bob@0", &b.to_bytes()));
    let reply = b.encrypt(rng, b"hi").unwrap();
    a.decrypt(&reply).unwrap();
    // Alice sends four in her new chain; Bob gets only the last: three
    // skipped keys.
    let mut late = Vec::new();
    for i in 0..4 {
        late.push(a.encrypt(rng, format!("late {i}").as_bytes()).unwrap());
    }
    b.decrypt(&late[3]).unwrap();
    history.extend(session_secrets("bob@1", &b.to_bytes()));
    // Bob replies (a new chain of his), Alice answers in yet another chain
    // and Bob reads one of the late ones: skipped keys of an older chain
    // stay while the current chain moves on.
    let reply = b.encrypt(rng, b"again").unwrap();
    a.decrypt(&reply).unwrap();
    let more = a.encrypt(rng, b"more").unwrap();
    b.decrypt(&more).unwrap();
    b.decrypt(&late[0]).unwrap();
    history.extend(session_secrets("alice@2", &a.to_bytes()));
    history.extend(session_secrets("bob@2", &b.to_bytes()));
    assert_eq!(b.skipped_message_keys(), 2);
    (a, b, history)
}

// ---------------------------------------------------------------------------
// The tests.

#[test]
fn identity_key_pair() {
    let seed = random32(&mut rng(1));
    let secrets = identity_secrets("identity", &seed);
    let all = ["identity seed", "identity X25519 scalar"];
    let pair = build_holding(&secrets, &all, || {
        Box::new(IdentityKeyPair::from_seed(&seed))
    });
    assert_drop_wipes("an IdentityKeyPair", &secrets, pair);
    // A clone is a second copy: it is wiped too.
    let original = IdentityKeyPair::from_seed(&seed);
    let clone = build_holding(&secrets, &all, || Box::new(original.clone()));
    assert_drop_wipes("a cloned IdentityKeyPair", &secrets, clone);
    // LocalIdentity holds one.
    let local = build_holding(&secrets, &all, || {
        Box::new(LocalIdentity {
            keys: IdentityKeyPair::from_seed(&seed),
            device_id: 3,
        })
    });
    assert_drop_wipes("a LocalIdentity", &secrets, local);
}

#[test]
fn signed_and_one_time_prekeys() {
    let mut rng = rng(2);
    let identity = IdentityKeyPair::from_seed(&random32(&mut rng));
    let spk = random32(&mut rng);
    let opk = random32(&mut rng);
    let mut secrets = Secrets::default();
    secrets.add("signed prekey", &spk);
    secrets.add("one-time prekey", &opk);
    let signed = || SignedPrekey::from_secret(&identity, 7, NOW, spk).unwrap();
    let one_time = || OneTimePrekey::from_secret(9, opk);
    assert_eq!(*signed().secret_bytes(), spk);
    assert_eq!(*one_time().secret_bytes(), opk);
    let boxed = build_holding(&secrets, &["signed prekey"], || Box::new(signed()));
    assert_drop_wipes("a SignedPrekey", &secrets, boxed);
    let boxed = build_holding(&secrets, &["one-time prekey"], || Box::new(one_time()));
    assert_drop_wipes("a OneTimePrekey", &secrets, boxed);
    let original = signed();
    let clone = build_holding(&secrets, &["signed prekey"], || Box::new(original.clone()));
    assert_drop_wipes("a cloned SignedPrekey", &secrets, clone);
    // In a collection that grows (moving its elements): no copy is left
    // in the blocks it frees as it grows, nor when it drops.
    let mut many = Secrets::default();
    let keys: Vec<[u8; 32]> = (0..20).map(|_| random32(&mut rng)).collect();
    for (i, k) in keys.iter().enumerate() {
        many.add(format!("one-time prekey {i}"), k);
    }
    let (list, found) = freed_secrets(&many, || {
        let mut list = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            list.push(OneTimePrekey::from_secret(i as u32, *k));
        }
        list
    });
    assert!(found.is_empty(), "a growing Vec of prekeys: {found:?}");
    assert_drop_wipes("a Vec of OneTimePrekeys", &many, list);
}

/// A prekey store that went through a life: rotations, many one-time
/// prekeys (the map's nodes split), some used and removed. Every secret it
/// ever held is a needle.
fn lived_prekey_store(rng: &mut ChaCha20Rng) -> (PrekeyStore, Secrets) {
    let identity = IdentityKeyPair::from_seed(&random32(rng));
    let mut secrets = Secrets::default();
    let mut store = PrekeyStore::new(rng, &identity, NOW).unwrap();
    for i in 0..3 {
        store
            .rotate_signed_prekey(rng, &identity, NOW + 10 * (i + 1))
            .unwrap();
    }
    store.generate_one_time_prekeys(rng, 40);
    for k in store.signed_prekeys() {
        secrets.add(format!("signed prekey {}", k.id()), &k.secret_bytes());
    }
    for k in store.one_time_prekeys() {
        secrets.add(format!("one-time prekey {}", k.id()), &k.secret_bytes());
    }
    for id in [1, 2, 17, 18, 40] {
        assert!(store.remove_one_time_prekey(id));
    }
    store.forget_retired_before(NOW + 15).unwrap();
    store.remove_one_time_prekeys_below(5);
    (store, secrets)
}

#[test]
fn prekey_store() {
    // Learn the secrets, then build the same store again under the control.
    let (store, secrets) = lived_prekey_store(&mut rng(3));
    let mut held: Vec<String> = store
        .signed_prekeys()
        .map(|k| format!("signed prekey {}", k.id()))
        .collect();
    held.extend(
        store
            .one_time_prekeys()
            .map(|k| format!("one-time prekey {}", k.id())),
    );
    drop(store);
    let held: Vec<&str> = held.iter().map(String::as_str).collect();
    let store = build_holding(&secrets, &held, || {
        Box::new(lived_prekey_store(&mut rng(3)).0)
    });
    assert_drop_wipes("a PrekeyStore", &secrets, store);
    // Its life itself (rotations, removals, nodes splitting) frees no block
    // with a secret in it.
    let ((_, lived), found) = freed_secrets(&secrets, || lived_prekey_store(&mut rng(3)));
    assert!(found.is_empty(), "a PrekeyStore's life: {found:?}");
    drop(lived);
    // PrekeyState holds one.
    let (prekeys, secrets) = lived_prekey_store(&mut rng(4));
    let state = PrekeyState {
        prekeys,
        upload_counter: 1,
        last_rotation: NOW,
        retired_at: vec![(1, NOW)],
        one_time_retired: Vec::new(),
        upload_pending: false,
        accepted: Vec::new(),
    };
    assert_drop_wipes("a PrekeyState", &secrets, Box::new(state));
}

#[test]
fn session_after_messages() {
    // Learn the secrets (every state both went through), then build the
    // same sessions again under the control.
    let (a, b, history) = established(&mut rng(5));
    let mut secrets = history;
    let alice_now = session_secrets("alice now", &a.to_bytes());
    let bob_now = session_secrets("bob now", &b.to_bytes());
    assert!(bob_now.names.iter().any(|n| n.contains("skipped key")));
    let held: Vec<String> = alice_now
        .names
        .iter()
        .chain(&bob_now.names)
        .cloned()
        .collect();
    secrets.extend(alice_now);
    secrets.extend(bob_now);
    drop((a, b));
    let held: Vec<&str> = held.iter().map(String::as_str).collect();
    let (a, b, _) = build_holding(&secrets, &held, || established(&mut rng(5)));
    assert_drop_wipes("Alice's Session", &secrets, Box::new(a));
    assert_drop_wipes("Bob's Session (skipped keys held)", &secrets, Box::new(b));
    // The whole exchange, replayed under the scan, freed no block holding
    // a secret of any state either side went through.
    let (sessions, found) = freed_secrets(&secrets, || established(&mut rng(5)));
    assert!(found.is_empty(), "the exchange: {found:?}");
    drop(sessions);
}

/// The skipped keys read from the state are the message keys: checked
/// against the key `hazmat::encrypt_exposing_message_key` reports.
#[test]
fn skipped_keys_in_the_state_are_the_message_keys() {
    let mut rng = rng(6);
    let (mut a, mut b, _) = established(&mut rng);
    let (skipped, mk) = hazmat::encrypt_exposing_message_key(&mut a, &mut rng, b"x").unwrap();
    let after = a.encrypt(&mut rng, b"y").unwrap();
    b.decrypt(&after).unwrap();
    let secrets = session_secrets("bob", &b.to_bytes());
    assert!(
        secrets.values.contains(&mk),
        "the exposed key is not in the state"
    );
    // Using a skipped key, and a new chain's step, free no block holding a
    // secret of any state the session went through.
    let mut all = secrets;
    all.add("exposed message key", &mk);
    let (plain, found) = freed_secrets(&all, || b.decrypt(&skipped).unwrap());
    assert_eq!(plain, b"x");
    assert!(found.is_empty(), "decrypting with a skipped key: {found:?}");
}

#[test]
fn session_record_with_archived_and_evicted_sessions() {
    let mut rng = rng(7);
    let local = DeviceAddress::new(IdentityKeyPair::from_seed(&random32(&mut rng)).public(), 1);
    let peer = DeviceAddress::new(IdentityKeyPair::from_seed(&random32(&mut rng)).public(), 1);
    let mut record = SessionRecord::new();
    let mut secrets = Secrets::default();
    for i in 0..6u64 {
        let (a, _, _) = established(&mut rng);
        secrets.extend(session_secrets(&format!("session {i}"), &a.to_bytes()));
        // The record's list grows (the fifth moves the four before it),
        // then, with at most two archived beside the current, the older
        // ones are evicted (the list shifts).
        let max_archived = if i < 5 { 40 } else { 2 };
        let ((), found) = freed_secrets(&secrets, || {
            record.insert(
                SessionEntry::new(a, i, NOW + i),
                max_archived,
                &local,
                &peer,
            )
        });
        assert!(found.is_empty(), "inserting session {i}: {found:?}");
    }
    assert_eq!(record.entries().len(), 3);
    assert_drop_wipes("a SessionRecord", &secrets, Box::new(record));
}

/// The `Zeroizing` buffers the crate hands out: built without leaving a
/// copy behind (no reallocation of a half-built buffer), wiped on drop.
#[test]
fn serialized_secrets_are_zeroizing_buffers() {
    let mut rng = rng(8);
    let (a, b, _) = established(&mut rng);
    let mut secrets = session_secrets("alice", &a.to_bytes());
    secrets.extend(session_secrets("bob", &b.to_bytes()));
    let ((), found) = freed_secrets(&secrets, || drop(a.to_bytes()));
    assert!(found.is_empty(), "Session::to_bytes: {found:?}");
    let local = DeviceAddress::new(a.local_identity(), 1);
    let peer = DeviceAddress::new(a.remote_identity(), 1);
    let mut record = SessionRecord::new();
    record.insert(SessionEntry::new(a, 1, NOW), 40, &local, &peer);
    record.insert(SessionEntry::new(b, 2, NOW), 40, &local, &peer);
    let ((), found) = freed_secrets(&secrets, || drop(record.to_bytes()));
    assert!(found.is_empty(), "SessionRecord::to_bytes: {found:?}");

    let (prekeys, secrets) = lived_prekey_store(&mut rng);
    let ((), found) = freed_secrets(&secrets, || drop(prekeys.to_bytes()));
    assert!(found.is_empty(), "PrekeyStore::to_bytes: {found:?}");
    let state = PrekeyState {
        prekeys,
        upload_counter: 1,
        last_rotation: NOW,
        retired_at: vec![(1, NOW), (2, NOW)],
        one_time_retired: vec![(5, NOW)],
        upload_pending: true,
        accepted: vec![(1, [7; 16])],
    };
    let ((), found) = freed_secrets(&secrets, || drop(state.to_bytes()));
    assert!(found.is_empty(), "PrekeyState::to_bytes: {found:?}");

    let seed = random32(&mut rng);
    let secrets = identity_secrets("identity", &seed);
    let identity = LocalIdentity {
        keys: IdentityKeyPair::from_seed(&seed),
        device_id: 1,
    };
    let ((), found) = freed_secrets(&secrets, || drop(identity.to_bytes()));
    assert!(found.is_empty(), "LocalIdentity::to_bytes: {found:?}");
    let ((), found) = freed_secrets(&secrets, || drop(identity.keys.seed()));
    assert!(found.is_empty(), "IdentityKeyPair::seed: {found:?}");
}

/// A quarantined record keeps the stored bytes (session secrets, for a
/// store that does not seal) in a zeroizing buffer.
#[test]
fn quarantined_bytes() {
    let (a, _, _) = established(&mut rng(9));
    let bytes = a.to_bytes();
    let secrets = session_secrets("quarantined", &bytes);
    let quarantined = Quarantined {
        peer: DeviceAddress::new(a.remote_identity(), 1),
        at: NOW,
        bytes: bytes.clone(),
        reason: "test".to_string(),
    };
    // The control: a plain copy of the bytes, freed, shows the secrets.
    let ((), found) = freed_secrets(&secrets, || drop(bytes.to_vec()));
    assert!(
        !found.is_empty(),
        "control: a plain Vec of the state was not seen"
    );
    assert_drop_wipes("a Quarantined record", &secrets, quarantined);
}

/// The SQLite store's at-rest keys (derived from the application's key as
/// SPEC.md 20.3 says, recomputed here with hkdf) are wiped when the store
/// drops: the cipher's key schedule included.
#[cfg(feature = "sqlite")]
#[test]
fn sqlite_store_keys() {
    use hkdf::Hkdf;
    let app_key = random32(&mut rng(10));
    let derive = |info: &[u8]| {
        let mut out = [0u8; 32];
        Hkdf::<Sha256>::new(None, &app_key)
            .expand(info, &mut out)
            .unwrap();
        out
    };
    let mut secrets = Secrets::default();
    secrets.add("application key", &app_key);
    secrets.add(
        "at-rest key",
        &derive(b"cubbyhole/v1 sqlite store at-rest key"),
    );
    secrets.add("route key", &derive(b"cubbyhole/v1 sqlite store route key"));
    let seed = random32(&mut rng(11));
    secrets.extend(identity_secrets("identity", &seed));
    let open = || {
        let mut store = SqliteStore::open_in_memory(&app_key).unwrap();
        store
            .set_identity(&LocalIdentity {
                keys: IdentityKeyPair::from_seed(&seed),
                device_id: 1,
            })
            .unwrap();
        assert!(store.identity().unwrap().is_some());
        Box::new(store)
    };
    // The control: the store's memory shows the route key and (AES-NI's
    // key schedule starts with the key) the at-rest key or, without AES-NI,
    // at least the route key.
    let store = build_holding(&secrets, &["route key"], open);
    assert_drop_wipes("a SqliteStore", &secrets, store);
}
