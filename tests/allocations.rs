//! The steady-state encrypt and decrypt paths allocate nothing beyond the
//! caller's output buffer: `Session::encrypt_into` appends to a `Vec` that
//! already has room, `Session::decrypt_incoming` likewise, and neither
//! allocates on the heap for keys, headers or associated data.
//!
//! Counted with a global allocator wrapper (this test binary only; the
//! crate itself forbids `unsafe`). The counter is per thread, so the test
//! harness's other threads do not disturb it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use cubbyhole::bundle::FreshnessPolicy;
use cubbyhole::{IdentityKeyPair, Incoming, PrekeyBundle, PrekeyStore, Session, SessionConfig};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// wrapper only counts allocations on the calling thread.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

const NOW: u64 = 1_800_000_000;

/// Alice's new session to Bob (who has one one-time prekey), Bob and his
/// prekeys.
fn initiated(rng: &mut ChaCha20Rng) -> (Session, IdentityKeyPair, PrekeyStore) {
    let alice = IdentityKeyPair::generate(rng);
    let bob = IdentityKeyPair::generate(rng);
    let mut prekeys = PrekeyStore::new(rng, &bob, NOW).expect("time in unix seconds");
    prekeys.generate_one_time_prekeys(rng, 1);
    let bundle = PrekeyBundle::decode(&prekeys.bundle(&bob).encode())
        .unwrap()
        .verify(NOW, FreshnessPolicy::default())
        .unwrap();
    let a = Session::initiate(rng, &alice, &bundle, SessionConfig::default()).unwrap();
    (a, bob, prekeys)
}

/// Alice and Bob past the prekey messages, each with a chain in both
/// directions.
fn established(rng: &mut ChaCha20Rng) -> (Session, Session) {
    let (mut a, bob, mut prekeys) = initiated(rng);
    let first = a.encrypt(rng, b"hello").unwrap();
    let mut b = prekeys
        .accept(
            &bob,
            &Incoming::decode(&first).unwrap(),
            SessionConfig::default(),
        )
        .unwrap()
        .session;
    let reply = b.encrypt(rng, b"hi").unwrap();
    a.decrypt(&reply).unwrap();
    let again = a.encrypt(rng, b"again").unwrap();
    b.decrypt(&again).unwrap();
    (a, b)
}

#[test]
fn steady_state_encrypt_and_decrypt_allocate_only_the_output() {
    let mut rng = ChaCha20Rng::seed_from_u64(42);
    let (mut a, mut b) = established(&mut rng);
    for size in [0usize, 64, 1024, 16 * 1024] {
        let plaintext = vec![0x5a; size];
        let mut wire = Vec::with_capacity(size + 256);
        let mut out = Vec::with_capacity(size + 256);
        for _ in 0..3 {
            wire.clear();
            out.clear();
            let before = allocations();
            a.encrypt_into(&mut rng, &plaintext, &mut wire).unwrap();
            let encrypted = allocations() - before;
            assert_eq!(
                encrypted, 0,
                "encrypt of {size} B allocated {encrypted} times"
            );

            let incoming = Incoming::decode(&wire).unwrap();
            let before = allocations();
            b.decrypt_incoming(&incoming, &mut out).unwrap();
            let decrypted = allocations() - before;
            assert_eq!(
                decrypted, 0,
                "decrypt of {size} B allocated {decrypted} times"
            );
            assert_eq!(out, plaintext);
        }
    }
    // Into an empty buffer: exactly one allocation, the reservation for
    // the whole message (prefix, ciphertext and tag).
    for size in [0usize, 64, 1024, 16 * 1024] {
        let plaintext = vec![0x5a; size];
        let mut wire = Vec::new();
        let before = allocations();
        a.encrypt_into(&mut rng, &plaintext, &mut wire).unwrap();
        assert_eq!(
            allocations() - before,
            1,
            "encrypt of {size} B into an empty buffer"
        );
        assert_eq!(b.decrypt(&wire).unwrap(), plaintext);
    }
    // The counter works: the convenience form allocates its output.
    let before = allocations();
    let wire = a.encrypt(&mut rng, b"x").unwrap();
    assert!(allocations() > before);
    assert_eq!(b.decrypt(&wire).unwrap(), b"x");
}

/// The initiator's prekey messages carry the longest prefix of all
/// (`MAX_PREFIX_LEN` exactly), so a reservation that is short by even one
/// byte shows up as a second allocation here.
#[test]
fn prekey_message_into_an_empty_buffer_is_one_allocation() {
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let (mut a, _, _) = initiated(&mut rng);
    for size in [0usize, 1, 64, 1024, 16 * 1024] {
        let plaintext = vec![0x5a; size];
        let mut wire = Vec::new();
        let before = allocations();
        a.encrypt_into(&mut rng, &plaintext, &mut wire).unwrap();
        assert_eq!(
            allocations() - before,
            1,
            "prekey message of {size} B into an empty buffer"
        );
        assert!(Incoming::decode(&wire).unwrap().prekey().is_some());
    }
}
