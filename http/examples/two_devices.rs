//! A two-device messenger on a multi-thread Tokio runtime: each device is a
//! [`Client`] over an [`HttpRelay`], and runs its receive loop in a task of
//! its own (`tokio::spawn`), waiting on the relay with long polls. Alice
//! sends a few messages and waits for the answers; Bob answers every
//! message as it arrives.
//!
//! ```text
//! cargo run -p cubbyhole-http --example two_devices                     # starts a relay
//! cargo run -p cubbyhole-http --example two_devices -- http://127.0.0.1:8080
//! ```
//!
//! Without a URL the example starts a relay server (SQLite in memory) on a
//! loopback port in this process, on the same runtime.
//!
//! The devices keep their state in a [`SqliteStore`] each (files in a
//! temporary directory, secrets encrypted under a key that a real app keeps
//! in the OS keychain): a task spawned on a multi-thread runtime needs a
//! `Send` future, which a client's futures are with this store.

use std::error::Error;
use std::time::{SystemTime, UNIX_EPOCH};

use cubbyhole::client::{Client, ClientConfig};
use cubbyhole::storage::SqliteStore;
use cubbyhole::transport::DeviceAddress;
use cubbyhole::OsRng;
use cubbyhole_http::HttpRelay;

type Device = Client<SqliteStore, HttpRelay, HttpRelay>;
type Failure = Box<dyn Error + Send + Sync>;

const QUESTIONS: [&str; 3] = ["Hi Bob, it's Alice.", "Lunch at noon?", "See you."];

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn device(relay: &HttpRelay, dir: &std::path::Path, name: &str) -> Result<Device, Failure> {
    let key = [name.as_bytes()[0]; 32];
    let store = SqliteStore::open(dir.join(format!("{name}.db")), &key)?;
    let mut device = Client::open(
        store,
        relay.clone(),
        relay.clone(),
        ClientConfig::default(),
        &mut OsRng,
    )
    .await?;
    device.maintain_prekeys(&mut OsRng, now()).await?;
    Ok(device)
}

/// Waits on the relay (long polls of up to 10 s) for the next messages and
/// takes them out of the inbox: `(sender, text)`.
async fn next_messages(device: &mut Device) -> Result<Vec<(DeviceAddress, String)>, Failure> {
    loop {
        device.receive_waiting(&mut OsRng, now(), 10_000).await?;
        let inbox = device.inbox().await?;
        if inbox.is_empty() {
            continue;
        }
        let mut out = Vec::new();
        for message in inbox {
            out.push((
                message.from,
                String::from_utf8_lossy(&message.body).into_owned(),
            ));
            device.remove_from_inbox(&message.envelope_id).await?;
        }
        return Ok(out);
    }
}

/// Bob: answers every message until he has answered `count`.
async fn bob_loop(mut bob: Device, count: usize) -> Result<(), Failure> {
    let mut answered = 0;
    while answered < count {
        for (from, text) in next_messages(&mut bob).await? {
            println!("   Bob got:   {text}");
            let reply = format!("re: {text}");
            bob.send(&mut OsRng, &from, reply.as_bytes(), now()).await?;
            answered += 1;
        }
    }
    Ok(())
}

/// Alice: sends the questions, then waits for one answer to each.
async fn alice_loop(mut alice: Device, bob: DeviceAddress) -> Result<Vec<String>, Failure> {
    for text in QUESTIONS {
        alice.send(&mut OsRng, &bob, text.as_bytes(), now()).await?;
        println!("   Alice sent: {text}");
    }
    let mut answers = Vec::new();
    while answers.len() < QUESTIONS.len() {
        for (_, text) in next_messages(&mut alice).await? {
            println!("   Alice got: {text}");
            answers.push(text);
        }
    }
    Ok(answers)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Failure> {
    let mut server = None;
    let url = match std::env::args().nth(1) {
        Some(url) => url,
        None => {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let url = format!("http://{}", listener.local_addr()?);
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let config = cubbyhole_relay::ServerConfig::unpriced();
            let task = tokio::spawn(cubbyhole_relay::serve(listener, config, async move {
                let _ = stopped.await;
            }));
            server = Some((stop, task));
            url
        }
    };
    println!("relay at {url}");
    // Built inside the runtime: the requests run on it.
    let relay = HttpRelay::new(&url)?;
    relay.health().await?;

    let dir = std::env::temp_dir().join(format!("cubbyhole-two-devices-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let bob = device(&relay, &dir, "bob").await?;
    let alice = device(&relay, &dir, "alice").await?;
    let bob_address = bob.address();
    let bob_task = tokio::spawn(bob_loop(bob, QUESTIONS.len()));
    let alice_task = tokio::spawn(alice_loop(alice, bob_address));
    let answers = alice_task.await??;
    bob_task.await??;
    let mut expected: Vec<String> = QUESTIONS.iter().map(|q| format!("re: {q}")).collect();
    let mut got = answers.clone();
    expected.sort();
    got.sort();
    assert_eq!(got, expected, "every question was answered once");
    println!("done: {} questions answered", answers.len());
    std::fs::remove_dir_all(&dir)?;

    if let Some((stop, task)) = server {
        let _ = stop.send(());
        task.await??;
    }
    Ok(())
}
