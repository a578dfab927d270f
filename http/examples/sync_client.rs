//! Two devices messaging through an HTTP relay from plain synchronous code:
//! no async runtime in the application, every call driven to completion by
//! [`cubbyhole::client::block_on`]. The [`HttpRelay`] is built outside any
//! Tokio runtime, so it runs its requests on a private runtime thread of
//! its own (see the crate docs, "Using it from synchronous code").
//!
//! ```text
//! cargo run -p cubbyhole-http --example sync_client                     # starts a relay
//! cargo run -p cubbyhole-http --example sync_client -- http://127.0.0.1:8080
//! ```
//!
//! Without a URL the example starts a relay server (SQLite in memory) on a
//! loopback port, on a thread with its own Tokio runtime: that is the
//! server's business, the client code below never sees a runtime.

use std::error::Error;
use std::time::{SystemTime, UNIX_EPOCH};

use cubbyhole::client::{block_on, Client, ClientConfig};
use cubbyhole::storage::SqliteStore;
use cubbyhole::OsRng;
use cubbyhole_http::HttpRelay;

type Device = Client<SqliteStore, HttpRelay, HttpRelay>;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn open(dir: &std::path::Path, name: &str, relay: &HttpRelay) -> Result<Device, Box<dyn Error>> {
    // A real app keeps the store key in the OS keychain.
    let key = [name.as_bytes()[0]; 32];
    let store = SqliteStore::open(dir.join(format!("{name}.db")), &key)?;
    Ok(block_on(Client::open(
        store,
        relay.clone(),
        relay.clone(),
        ClientConfig::default(),
        &mut OsRng,
    ))?)
}

/// Receives (waiting up to 10 s on the relay) until `count` messages are in
/// the device's inbox; takes them out and returns their texts.
fn receive(device: &mut Device, count: usize) -> Result<Vec<String>, Box<dyn Error>> {
    let mut texts = Vec::new();
    for _ in 0..20 {
        block_on(device.receive_waiting(&mut OsRng, now(), 10_000))?;
        for message in block_on(device.inbox())? {
            texts.push(String::from_utf8_lossy(&message.body).into_owned());
            block_on(device.remove_from_inbox(&message.envelope_id))?;
        }
        if texts.len() >= count {
            return Ok(texts);
        }
    }
    Err(format!("received {} of {count} messages", texts.len()).into())
}

/// A relay server on a loopback port, on a thread of its own (with its own
/// Tokio runtime); stops when the returned sender is dropped.
fn start_relay() -> Result<(String, tokio::sync::oneshot::Sender<()>), Box<dyn Error>> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (url_tx, url_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("the relay's runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("a loopback port");
            let url = format!("http://{}", listener.local_addr().expect("its address"));
            let _ = url_tx.send(url);
            let config = cubbyhole_relay::ServerConfig::unpriced();
            cubbyhole_relay::serve(listener, config, async move {
                let _ = stopped.await;
            })
            .await
            .expect("the relay server");
        });
    });
    Ok((url_rx.recv()?, stop))
}

fn main() -> Result<(), Box<dyn Error>> {
    let (url, _server) = match std::env::args().nth(1) {
        Some(url) => (url, None),
        None => {
            let (url, stop) = start_relay()?;
            (url, Some(stop))
        }
    };
    println!("relay at {url}");
    let relay = HttpRelay::new(&url)?;
    assert!(relay.has_private_runtime(), "built outside any runtime");
    block_on(relay.health())?;

    let dir = std::env::temp_dir().join(format!("cubbyhole-sync-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = conversation(&relay, &dir);
    std::fs::remove_dir_all(&dir)?;
    result
}

fn conversation(relay: &HttpRelay, dir: &std::path::Path) -> Result<(), Box<dyn Error>> {
    let mut bob = open(dir, "bob", relay)?;
    block_on(bob.maintain_prekeys(&mut OsRng, now()))?;
    let mut alice = open(dir, "alice", relay)?;
    block_on(alice.maintain_prekeys(&mut OsRng, now()))?;

    let questions = ["Hi Bob, it's Alice.", "Are you there?"];
    for text in questions {
        block_on(alice.send(&mut OsRng, &bob.address(), text.as_bytes(), now()))?;
        println!("Alice -> Bob: {text}");
    }
    let got = receive(&mut bob, questions.len())?;
    assert_eq!(got, questions, "Bob received what Alice sent, in order");
    for text in &got {
        let reply = format!("Bob got: {text}");
        block_on(bob.send(&mut OsRng, &alice.address(), reply.as_bytes(), now()))?;
        println!("Bob -> Alice: {reply}");
    }
    let replies = receive(&mut alice, questions.len())?;
    assert_eq!(
        replies,
        questions.map(|q| format!("Bob got: {q}")),
        "Alice received Bob's replies"
    );
    println!(
        "Alice's safety number: {}",
        alice.safety_number(&bob.address())?
    );
    println!("done: {} messages each way", questions.len());
    Ok(())
}
