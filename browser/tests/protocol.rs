//! The protocol and client layer in a browser (wasm-bindgen-test in
//! headless Chromium): the crate's conformance suites that need no
//! operating system, sessions of both profiles, and two clients talking
//! through an in-process relay, all with the browser's randomness
//! (`OsRng` over `crypto.getRandomValues`).

#[cfg(not(target_arch = "wasm32"))]
#[test]
#[ignore = "runs in a browser: cargo test -p cubbyhole-browser --target wasm32-unknown-unknown"]
fn in_a_browser_only() {}

#[cfg(target_arch = "wasm32")]
mod browser {
    use std::sync::Arc;

    use cubbyhole::client::{Client, ClientConfig};
    use cubbyhole::relay::{InProcessRelay, MemoryRelayStorage, Relay, RelayConfig};
    use cubbyhole::storage::MemoryStore;
    use cubbyhole::transport::conformance::Options;
    use cubbyhole::{
        FreshnessPolicy, IdentityKeyPair, Incoming, OsRng, PrekeyBundle, PrekeyStore, Session,
        SessionConfig,
    };
    use rand_core::RngCore;
    use wasm_bindgen_test::*;

    wasm_bindgen_test_configure!(run_in_browser);

    /// The browser's clock, in unix seconds (`InProcessRelay::new` would read
    /// `SystemTime`, which `wasm32-unknown-unknown` lacks).
    fn now() -> u64 {
        (js_sys::Date::now() / 1000.0) as u64
    }

    fn relay() -> InProcessRelay<MemoryRelayStorage> {
        InProcessRelay::with_clock(
            Relay::new(MemoryRelayStorage::new(), RelayConfig::unpriced()),
            Arc::new(now),
        )
    }

    #[wasm_bindgen_test]
    fn os_rng_is_the_browsers() {
        let (mut a, mut b) = ([0u8; 32], [0u8; 32]);
        OsRng.fill_bytes(&mut a);
        OsRng.fill_bytes(&mut b);
        assert_ne!(a, [0u8; 32]);
        assert_ne!(a, b);
    }

    #[wasm_bindgen_test]
    async fn store_conformance_memory_store() {
        if let Err(v) = cubbyhole::storage::conformance::try_run_async(MemoryStore::new).await {
            panic!("{v:#?}");
        }
    }

    #[wasm_bindgen_test]
    fn relay_storage_conformance_memory() {
        if let Err(v) = cubbyhole::relay::conformance::try_run(MemoryRelayStorage::new) {
            panic!("{v:#?}");
        }
    }

    #[wasm_bindgen_test]
    async fn transport_conformance_in_process_relay() {
        let make = || {
            let r = relay();
            (r.clone(), r)
        };
        // The in-process relay does not long-poll (the suite's waiting check
        // would need a thread for its timer).
        if let Err(v) =
            cubbyhole::transport::conformance::check_all(make, &Options::default()).await
        {
            panic!("{}", cubbyhole::transport::conformance::report(&v));
        }
    }

    struct Bob {
        keys: IdentityKeyPair,
        prekeys: PrekeyStore,
    }

    fn bob(at: u64) -> Bob {
        let keys = IdentityKeyPair::generate(&mut OsRng);
        let mut prekeys = PrekeyStore::new(&mut OsRng, &keys, at).expect("prekeys");
        prekeys.generate_one_time_prekeys(&mut OsRng, 2);
        Bob { keys, prekeys }
    }

    #[wasm_bindgen_test]
    fn a_v1_session_round_trips() {
        let at = now();
        let mut bob = bob(at);
        let alice = IdentityKeyPair::generate(&mut OsRng);
        let published = bob.prekeys.bundle(&bob.keys).encode();
        let bundle = PrekeyBundle::decode(&published)
            .expect("decode")
            .verify(at, FreshnessPolicy::default())
            .expect("verify");
        let mut a = Session::initiate(&mut OsRng, &alice, &bundle, SessionConfig::default())
            .expect("initiate");
        let first = a.encrypt(&mut OsRng, b"hello bob").expect("encrypt");
        let second = a.encrypt(&mut OsRng, b"second").expect("encrypt");
        let accepted = bob
            .prekeys
            .accept(
                &bob.keys,
                &Incoming::decode(&first).expect("decode"),
                SessionConfig::default(),
            )
            .expect("accept");
        assert_eq!(accepted.plaintext, b"hello bob");
        let mut b = accepted.session;
        assert_eq!(b.decrypt(&second).expect("decrypt"), b"second");
        assert!(b.decrypt(&second).is_err(), "a replayed message is refused");
        let reply = b.encrypt(&mut OsRng, b"hi alice").expect("encrypt");
        assert_eq!(a.decrypt(&reply).expect("decrypt"), b"hi alice");
        assert!(!a.sends_prekey_messages());
        // A tampered message does not open.
        let mut bad = a.encrypt(&mut OsRng, b"tamper").expect("encrypt");
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(b.decrypt(&bad).is_err());
        // Saved and restored.
        let saved = b.to_bytes().to_vec();
        let mut b =
            Session::from_bytes(&saved, bob.keys.public(), alice.public()).expect("restore");
        let after = a.encrypt(&mut OsRng, b"after restore").expect("encrypt");
        // (the tampered message's key is skipped, not consumed: the next one
        // still opens)
        assert_eq!(b.decrypt(&after).expect("decrypt"), b"after restore");
    }

    #[wasm_bindgen_test]
    fn a_v2_sealed_session_round_trips() {
        const WINDOW: u32 = 32;
        let at = now();
        let mut bob = bob(at);
        let alice = IdentityKeyPair::generate(&mut OsRng);
        let bundle = PrekeyBundle::decode(&bob.prekeys.bundle(&bob.keys).encode())
            .expect("decode")
            .verify(at, FreshnessPolicy::default())
            .expect("verify");
        let mut a = Session::initiate_sealed(&mut OsRng, &alice, &bundle, SessionConfig::default())
            .expect("initiate");
        assert!(a.is_sealed());
        let first = a.seal(&mut OsRng, b"hello bob").expect("seal");
        // Nothing of Alice's identity key is in the envelope.
        let ik = alice.public().as_bytes();
        assert!(!first.payload.windows(32).any(|w| w == ik));
        let inner = bob
            .prekeys
            .open_sealed(&first.payload)
            .expect("open_sealed");
        let accepted = bob
            .prekeys
            .accept(
                &bob.keys,
                &Incoming::decode(&inner).expect("decode"),
                SessionConfig::default(),
            )
            .expect("accept");
        assert_eq!(accepted.plaintext, b"hello bob");
        let mut b = accepted.session;
        let reply = b.seal(&mut OsRng, b"hi alice").expect("seal");
        let mut out = Vec::new();
        a.open(&reply.id, &reply.payload, WINDOW, &mut out)
            .expect("open");
        assert_eq!(out, b"hi alice");
        for text in [&b"one"[..], b"two", b"three"] {
            let m = a.seal(&mut OsRng, text).expect("seal");
            let mut out = Vec::new();
            b.open(&m.id, &m.payload, WINDOW, &mut out).expect("open");
            assert_eq!(out, text);
            let mut again = Vec::new();
            assert!(
                b.open(&m.id, &m.payload, WINDOW, &mut again).is_err(),
                "a replay is refused"
            );
        }
    }

    #[wasm_bindgen_test]
    async fn two_clients_talk_through_an_in_process_relay() {
        let at = now();
        let r = relay();
        let config = ClientConfig::default();
        let mut bob = Client::open(MemoryStore::new(), r.clone(), r.clone(), config, &mut OsRng)
            .await
            .expect("bob");
        let mut alice = Client::open(MemoryStore::new(), r.clone(), r.clone(), config, &mut OsRng)
            .await
            .expect("alice");
        assert!(bob.maintain_prekeys(&mut OsRng, at).await.expect("publish"));
        alice
            .maintain_prekeys(&mut OsRng, at)
            .await
            .expect("publish");
        let to = bob.address();
        for text in [&b"first"[..], b"second", b"third"] {
            let sent = alice.send(&mut OsRng, &to, text, at).await.expect("send");
            assert!(sent.deposited);
        }
        let report = bob.receive(&mut OsRng, at).await.expect("receive");
        assert_eq!(report.received, 3, "{report:?}");
        let bodies: Vec<Vec<u8>> = bob
            .inbox()
            .await
            .expect("inbox")
            .into_iter()
            .map(|m| m.body)
            .collect();
        assert_eq!(
            bodies,
            [b"first".to_vec(), b"second".to_vec(), b"third".to_vec()]
        );
        // And back.
        let from = alice.address();
        bob.send(&mut OsRng, &from, b"reply", at)
            .await
            .expect("send");
        alice.receive(&mut OsRng, at).await.expect("receive");
        let inbox = alice.inbox().await.expect("inbox");
        assert!(inbox.iter().any(|m| m.body == b"reply"));
    }
}
