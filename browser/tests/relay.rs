//! `HttpRelay` over the browser's `fetch` against a real relay server, in
//! headless Chromium: the status and error mapping, the answer bound, the
//! request timeout, an unreachable relay, URL checks, a dropped request,
//! and two clients talking through it with a long poll.
//!
//! The relay is started outside the browser (`.ci/run` starts
//! `cubbyhole-relay --memory --cors-origin '*'` on a loopback port) and
//! named by `CUBBYHOLE_TEST_RELAY_URL` when the tests are built; without
//! it they are built ignored (`build.rs`). Under `CI=1` at build time an
//! unset URL fails the guard test instead.

#[cfg(not(target_arch = "wasm32"))]
#[test]
#[ignore = "runs in a browser: cargo test -p cubbyhole-browser --target wasm32-unknown-unknown"]
fn relay_tests_run_in_the_browser() {}

#[cfg(target_arch = "wasm32")]
mod browser {
    use std::time::Duration;

    use cubbyhole::client::{Client, ClientConfig};
    use cubbyhole::storage::MemoryStore;
    use cubbyhole::transport::{DeviceAddress, Mailbox, PrekeyDirectory, TransportError};
    use cubbyhole::OsRng;
    use cubbyhole_http::{HttpRelay, HttpRelayConfig};
    use wasm_bindgen_test::*;

    wasm_bindgen_test_configure!(run_in_browser);

    const URL: &str = match option_env!("CUBBYHOLE_TEST_RELAY_URL") {
        Some(url) => url,
        None => "http://127.0.0.1:9",
    };

    fn now() -> u64 {
        (js_sys::Date::now() / 1000.0) as u64
    }

    #[wasm_bindgen_test]
    fn the_relay_tests_are_not_ignored_in_ci() {
        let in_ci = matches!(option_env!("CI"), Some("1" | "true"));
        if in_ci && !cfg!(cubbyhole_test_relay) {
            panic!("CI=1 but CUBBYHOLE_TEST_RELAY_URL was not set: the relay tests are ignored");
        }
    }

    #[wasm_bindgen_test]
    #[cfg_attr(
        not(cubbyhole_test_relay),
        ignore = "set CUBBYHOLE_TEST_RELAY_URL to a relay started with --cors-origin '*'"
    )]
    async fn answers_and_failures_map_as_natively() {
        let relay = HttpRelay::new(URL).expect("relay");
        assert!(!relay.has_private_runtime());
        relay.health().await.expect("health");
        let device = DeviceAddress {
            identity: [7; 32],
            device_id: 1,
        };
        assert_eq!(
            relay.challenge(&device.mailbox()).await,
            Err(TransportError::NotFound)
        );
        assert_eq!(
            relay.fetch_bundle(&device).await,
            Err(TransportError::NotFound)
        );
        assert!(matches!(
            relay.publish(b"garbage").await,
            Err(TransportError::BadRequest(_))
        ));
        // The answer bound: the health answer is longer than 8 bytes.
        let bounded = HttpRelay::with_config(
            URL,
            HttpRelayConfig {
                max_response_bytes: 8,
                ..HttpRelayConfig::default()
            },
        )
        .expect("relay");
        assert_eq!(
            bounded.health().await,
            Err(TransportError::Unavailable("relay answer too large"))
        );
        // The request timeout aborts the fetch: at 1 ms a loopback answer
        // cannot come first every time (tried up to five times).
        let impatient = HttpRelay::with_config(
            URL,
            HttpRelayConfig {
                request_timeout: Duration::from_millis(1),
                retries: 0,
                ..HttpRelayConfig::default()
            },
        )
        .expect("relay");
        let mut timed_out = false;
        for _ in 0..5 {
            match impatient.health().await {
                Err(TransportError::Unavailable("relay timed out")) => {
                    timed_out = true;
                    break;
                }
                Ok(()) => {}
                Err(other) => panic!("a timed-out request gave {other:?}"),
            }
        }
        assert!(timed_out, "five 1 ms requests all answered in time");
        // Nobody listens: every attempt fails to connect, retried.
        let nowhere = HttpRelay::with_config(
            "http://127.0.0.1:9",
            HttpRelayConfig {
                retries: 1,
                backoff_base: Duration::from_millis(10),
                ..HttpRelayConfig::default()
            },
        )
        .expect("relay");
        assert_eq!(
            nowhere.health().await,
            Err(TransportError::Unavailable("cannot connect to the relay"))
        );
        for url in [
            "",
            "relay.example",
            "ftp://relay.example",
            "http://x/?q=1",
            "http://x#f",
        ] {
            assert!(HttpRelay::new(url).is_err(), "{url:?} accepted");
        }
        assert_eq!(
            HttpRelay::new("http://127.0.0.1:8080/prefix/")
                .expect("relay")
                .base_url(),
            "http://127.0.0.1:8080/prefix"
        );
        // A request dropped while pending is aborted; the relay goes on.
        {
            let mut pending = Box::pin(relay.health());
            let waker = std::task::Waker::noop();
            let _ = std::future::Future::poll(
                pending.as_mut(),
                &mut std::task::Context::from_waker(waker),
            );
        }
        relay
            .health()
            .await
            .expect("health after a dropped request");
    }

    #[wasm_bindgen_test]
    #[cfg_attr(
        not(cubbyhole_test_relay),
        ignore = "set CUBBYHOLE_TEST_RELAY_URL to a relay started with --cors-origin '*'"
    )]
    async fn two_clients_talk_over_fetch_with_a_long_poll() {
        let relay = HttpRelay::new(URL).expect("relay");
        let config = ClientConfig::default();
        let mut bob = Client::open(
            MemoryStore::new(),
            relay.clone(),
            relay.clone(),
            config,
            &mut OsRng,
        )
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
        bob.maintain_prekeys(&mut OsRng, now())
            .await
            .expect("publish");
        alice
            .maintain_prekeys(&mut OsRng, now())
            .await
            .expect("publish");
        let to = bob.address();
        let sent = alice
            .send(&mut OsRng, &to, b"over fetch", now())
            .await
            .expect("send");
        assert!(sent.deposited);
        // A long poll returns as soon as something is there.
        let report = bob
            .receive_waiting(&mut OsRng, now(), 20_000)
            .await
            .expect("receive");
        assert_eq!(report.received, 1, "{report:?}");
        let inbox = bob.inbox().await.expect("inbox");
        assert_eq!(inbox.len(), 1);
        assert_eq!(inbox[0].body, b"over fetch");
        assert_eq!(inbox[0].from, alice.address());
        // The receipt comes back.
        bob.send(&mut OsRng, &alice.address(), b"and back", now())
            .await
            .expect("send");
        alice.receive(&mut OsRng, now()).await.expect("receive");
        assert!(alice
            .inbox()
            .await
            .expect("inbox")
            .iter()
            .any(|m| m.body == b"and back"));
        assert_eq!(
            alice.delivery(&sent.message).await.expect("delivery"),
            Some(cubbyhole::storage::DeliveryState::Delivered)
        );
    }
}
