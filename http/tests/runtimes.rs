//! `HttpRelay` from every kind of caller, against a real relay server (SQLite
//! in memory, on a loopback port, on its own runtime thread): synchronous
//! code with `cubbyhole::client::block_on` (the relay's private runtime), a
//! multi-thread Tokio runtime with `tokio::spawn` (the caller's runtime),
//! and the edges: the last clone dropped inside an async context, a
//! runtime shut down under the relay.

use std::time::{SystemTime, UNIX_EPOCH};

use cubbyhole::client::{block_on, Client, ClientConfig};
use cubbyhole::storage::MemoryStore;
use cubbyhole::transport::{DeviceAddress, TransportError};
use cubbyhole::OsRng;
use cubbyhole_http::HttpRelay;

type Device = Client<MemoryStore, HttpRelay, HttpRelay>;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A relay server on a loopback port, on a thread with its own runtime;
/// stops when the sender is dropped.
fn relay_server() -> (String, tokio::sync::oneshot::Sender<()>) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (url_tx, url_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            url_tx
                .send(format!("http://{}", listener.local_addr().unwrap()))
                .unwrap();
            let config = cubbyhole_relay::ServerConfig::unpriced();
            cubbyhole_relay::serve(listener, config, async move {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
    });
    (url_rx.recv().unwrap(), stop)
}

fn device(relay: &HttpRelay) -> Device {
    Client::open(
        MemoryStore::new(),
        relay.clone(),
        relay.clone(),
        ClientConfig::default(),
        &mut OsRng,
    )
    .wait()
    .unwrap()
}

fn take_inbox(device: &mut Device) -> Vec<(DeviceAddress, Vec<u8>)> {
    let inbox = device.inbox().wait().unwrap();
    for message in &inbox {
        device
            .remove_from_inbox(&message.envelope_id)
            .wait()
            .unwrap();
    }
    inbox.into_iter().map(|m| (m.from, m.body)).collect()
}

#[test]
fn block_on_drives_it_from_a_thread_without_a_runtime() {
    assert!(tokio::runtime::Handle::try_current().is_err());
    let (url, _server) = relay_server();
    let relay = HttpRelay::new(&url).unwrap();
    assert!(relay.has_private_runtime());
    block_on(relay.health()).unwrap();

    let mut alice = device(&relay);
    let mut bob = device(&relay);
    block_on(alice.maintain_prekeys(&mut OsRng, now())).unwrap();
    block_on(bob.maintain_prekeys(&mut OsRng, now())).unwrap();
    let sent = block_on(alice.send(&mut OsRng, &bob.address(), b"hello", now())).unwrap();
    assert!(sent.deposited);
    // A long poll, waited for by a parked thread.
    block_on(bob.receive_waiting(&mut OsRng, now(), 10_000)).unwrap();
    assert_eq!(
        take_inbox(&mut bob),
        vec![(alice.address(), b"hello".to_vec())]
    );
    block_on(bob.send(&mut OsRng, &alice.address(), b"hi", now())).unwrap();
    block_on(alice.receive_waiting(&mut OsRng, now(), 10_000)).unwrap();
    assert_eq!(
        take_inbox(&mut alice),
        vec![(bob.address(), b"hi".to_vec())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawned_tasks_use_it_on_a_multi_thread_runtime() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(cubbyhole_relay::serve(
        listener,
        cubbyhole_relay::ServerConfig::unpriced(),
        async move {
            let _ = stopped.await;
        },
    ));
    let relay = HttpRelay::new(&url).unwrap();
    assert!(!relay.has_private_runtime());

    let mut alice = device(&relay);
    let mut bob = device(&relay);
    alice.maintain_prekeys(&mut OsRng, now()).await.unwrap();
    bob.maintain_prekeys(&mut OsRng, now()).await.unwrap();
    let (alice_address, bob_address) = (alice.address(), bob.address());
    // Bob waits in a task of his own while Alice sends from another.
    let receiver = tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < 3 {
            bob.receive_waiting(&mut OsRng, now(), 10_000)
                .await
                .unwrap();
            got.extend(take_inbox(&mut bob));
        }
        got
    });
    let sender = tokio::spawn(async move {
        for text in [&b"one"[..], b"two", b"three"] {
            alice
                .send(&mut OsRng, &bob_address, text, now())
                .await
                .unwrap();
        }
    });
    sender.await.unwrap();
    let got = receiver.await.unwrap();
    let bodies: Vec<&[u8]> = got.iter().map(|(_, body)| body.as_slice()).collect();
    assert_eq!(bodies, [&b"one"[..], b"two", b"three"]);
    assert!(got.iter().all(|(from, _)| *from == alice_address));
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[test]
fn the_last_clone_may_drop_inside_an_async_context() {
    let relay = HttpRelay::new("http://127.0.0.1:1").unwrap();
    assert!(relay.has_private_runtime());
    let clone = relay.clone();
    drop(relay);
    // Dropping a Tokio runtime inside an async context panics; the relay's
    // private runtime is shut down without blocking instead.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async move { drop(clone) });
}

#[test]
fn a_runtime_shut_down_under_the_relay_answers_unavailable() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let relay = runtime.block_on(async { HttpRelay::new("http://127.0.0.1:1").unwrap() });
    assert!(!relay.has_private_runtime());
    drop(runtime);
    assert!(matches!(
        block_on(relay.health()),
        Err(TransportError::Unavailable(_))
    ));
}

/// Drives a future to completion on this thread (the client's futures, from
/// synchronous test code).
trait Wait: std::future::Future + Sized {
    fn wait(self) -> Self::Output {
        cubbyhole::client::block_on(self)
    }
}
impl<F: std::future::Future> Wait for F {}
