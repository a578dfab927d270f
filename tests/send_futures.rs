//! The client's futures are `Send` with the SQLite store, so an application
//! can run each device's loop in `tokio::spawn` on a multi-threaded runtime
//! (issue 13: this did not compile while the store held a `Cell`).

use std::sync::Arc;
use std::time::Duration;

use cubbyhole::client::{Client, ClientConfig};
use cubbyhole::relay::{InProcessRelay, MemoryRelayStorage, Relay, RelayConfig};
use cubbyhole::storage::{MemoryStore, SqliteStore};
use cubbyhole::OsRng;

const NOW: u64 = 1_900_000_000;
const KEY: [u8; 32] = [0x42; 32];

type Relayed = InProcessRelay<MemoryRelayStorage>;

/// Fails to compile unless the future is `Send` (and `'static` here).
fn spawnable<F: std::future::Future + Send + 'static>(f: F) -> F {
    f
}

#[test]
fn every_client_future_is_send_with_the_sqlite_store() {
    // Type-level: each public async method's future, held across awaits
    // with `&mut Client`, is Send (this test fails to compile otherwise).
    fn futures(mut c: Client<SqliteStore, Relayed, Relayed>) {
        let peer = c.address();
        let future = spawnable(async move {
            let mut rng = OsRng;
            let _ = c.maintain_prekeys(&mut rng, NOW).await;
            let _ = c.send(&mut rng, &peer, b"x", NOW).await;
            let _ = c.flush_outbox().await;
            let _ = c.resend(&mut rng, NOW).await;
            let _ = c.receive(&mut rng, NOW).await;
            let _ = c.receive_waiting(&mut rng, NOW, 10).await;
            let _ = c.restored_from_backup(&mut rng, NOW).await;
            let _ = c.inbox().await;
            let _ = c.missing().await;
            let _ = c.safety_number(&peer);
            let _ = c.trust(&peer.identity).await;
            c
        });
        drop(future);
    }
    let _ = futures;
}

#[test]
fn devices_run_in_tokio_spawn_on_a_multi_threaded_runtime() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let relay = InProcessRelay::with_clock(
            Relay::new(MemoryRelayStorage::new(), RelayConfig::unpriced()),
            Arc::new(|| NOW),
        );
        let dir = std::env::temp_dir().join(format!("cubbyhole-send-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let store = SqliteStore::open(dir.join("bob.db"), &KEY).unwrap();
        let config = ClientConfig::default();
        let mut bob = Client::open(store, relay.clone(), relay.clone(), config, &mut OsRng)
            .await
            .unwrap();
        bob.maintain_prekeys(&mut OsRng, NOW).await.unwrap();
        let bob_address = bob.address();
        let mut alice = Client::open(
            MemoryStore::new(),
            relay.clone(),
            relay.clone(),
            config,
            &mut OsRng,
        )
        .await
        .unwrap();
        alice.maintain_prekeys(&mut OsRng, NOW).await.unwrap();

        // Bob's receive loop runs on the runtime's worker threads.
        let receiver = tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..200 {
                bob.receive_waiting(&mut OsRng, NOW, 0).await.unwrap();
                for m in bob.inbox().await.unwrap() {
                    got.push(m.body.clone());
                    bob.remove_from_inbox(&m.envelope_id).await.unwrap();
                }
                if got.len() == 3 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            got
        });
        let sender = tokio::spawn(async move {
            for body in [&b"one"[..], b"two", b"three"] {
                alice
                    .send(&mut OsRng, &bob_address, body, NOW)
                    .await
                    .unwrap();
            }
        });
        sender.await.unwrap();
        let got = receiver.await.unwrap();
        assert_eq!(got, [b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]);
        std::fs::remove_dir_all(&dir).ok();
    });
}
