//! The offline story over the network: two devices with encrypted SQLite
//! stores talk through an HTTP relay.
//!
//! On its own (starts a relay on a loopback port in this process, runs Bob
//! and Alice, prints the conversation):
//!
//! ```text
//! cargo run -p cubbyhole-relay --example chat
//! ```
//!
//! Against a running relay, both sides in one process:
//!
//! ```text
//! cargo run -p cubbyhole-relay -- --db relay.db --listen 127.0.0.1:8080  # terminal 1: the relay
//! cargo run -p cubbyhole-relay --example chat -- --relay http://127.0.0.1:8080
//! ```
//!
//! Two people in two terminals (plus the relay's): each side keeps its
//! store in `--dir` (default: `cubbyhole-chat` in the temporary directory)
//! and leaves its address there for the other side to find; every line
//! typed is sent to the other side, and what arrives is printed as it
//! arrives (a long poll: no polling loop).
//!
//! ```text
//! cargo run -p cubbyhole-relay -- --db relay.db --listen 127.0.0.1:8080         # terminal 1
//! cargo run -p cubbyhole-relay --example chat -- --relay http://127.0.0.1:8080 --as bob    # 2
//! cargo run -p cubbyhole-relay --example chat -- --relay http://127.0.0.1:8080 --as alice  # 3
//! ```
//!
//! Quit a side with Ctrl-D (end of input) and start it again later: it
//! reopens its store from disk and receives what was sent meanwhile: the
//! relay kept it, opaque. Bob can publish and quit before Alice ever
//! starts; Alice can write to him while he is away.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cubbyhole::client::{block_on, Client, ClientConfig};
use cubbyhole::storage::SqliteStore;
use cubbyhole::transport::{DeviceAddress, PrekeyDirectory};
use cubbyhole::OsRng;
use cubbyhole_http::HttpRelay;
use cubbyhole_relay::{serve, ServerConfig, StorageConfig};
use tokio::sync::{mpsc, oneshot};

type Device = Client<SqliteStore, HttpRelay, HttpRelay>;

const USAGE: &str = "usage: chat [--relay URL] [--as bob|alice] [--dir PATH]";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The store key of each demo device (a real app keeps it in the OS
/// keychain).
fn store_key(name: &str) -> [u8; 32] {
    match name {
        "bob" => [0xB0; 32],
        _ => [0xA1; 32],
    }
}

fn open(dir: &Path, name: &str, relay: &HttpRelay) -> Result<Device, Box<dyn Error>> {
    let store = SqliteStore::open(dir.join(format!("{name}.db")), &store_key(name))?;
    Ok(block_on(Client::open(
        store,
        relay.clone(),
        relay.clone(),
        ClientConfig::default(),
        &mut OsRng,
    ))?)
}

/// What the relay shows over HTTP: each device's one-time prekey count
/// (anyone may ask) and its gauges from `/metrics` (how many envelopes,
/// mailboxes, devices): counts and opaque sizes, nothing more.
async fn show_relay(relay: &HttpRelay, devices: &[(&str, DeviceAddress)]) {
    println!("   -- what the relay holds --");
    for (name, device) in devices {
        let opks = match relay.one_time_prekeys_left(device).await {
            Ok(n) => n.to_string(),
            Err(e) => format!("({e})"),
        };
        println!(
            "   {name:<5} device {}..  mailbox {}..  {opks} one-time prekeys",
            &hex(&device.identity)[..16],
            &hex(&device.mailbox().0)[..16],
        );
    }
    let metrics = async {
        reqwest::get(format!("{}/metrics", relay.base_url()))
            .await?
            .error_for_status()?
            .text()
            .await
    };
    if let Ok(text) = metrics.await {
        for line in text.lines().filter(|l| {
            l.starts_with("cubbyhole_relay_envelopes ")
                || l.starts_with("cubbyhole_relay_mailboxes ")
                || l.starts_with("cubbyhole_relay_devices ")
        }) {
            println!("   /metrics: {line}");
        }
    }
}

fn print_inbox(
    device: &mut Device,
    name: &str,
    names: &[(&str, DeviceAddress)],
) -> Result<(), Box<dyn Error>> {
    for m in block_on(device.inbox())? {
        let from = names
            .iter()
            .find(|(_, a)| *a == m.from)
            .map_or("someone", |(n, _)| n);
        println!(
            "   {name} reads from {from}: {}",
            String::from_utf8_lossy(&m.body)
        );
        block_on(device.remove_from_inbox(&m.envelope_id))?;
    }
    Ok(())
}

/// Both sides in this process, as `offline_chat` does on an in-process
/// relay, but over HTTP.
async fn demo(relay: &HttpRelay, dir: &Path) -> Result<(), Box<dyn Error>> {
    println!("\n== Bob sets up his device and publishes prekeys, then goes offline");
    let mut bob = open(dir, "bob", relay)?;
    bob.maintain_prekeys(&mut OsRng, now()).await?;
    let bob_address = bob.address();
    drop(bob); // the store is closed; Bob is offline

    println!("\n== Alice sets up her device and writes to Bob");
    let mut alice = open(dir, "alice", relay)?;
    alice.maintain_prekeys(&mut OsRng, now()).await?;
    let alice_address = alice.address();
    let names = [("Alice", alice_address), ("Bob", bob_address)];
    for text in [
        "Hi Bob, it's Alice.",
        "I got your key from the directory.",
        "Write back when you're online.",
    ] {
        let sent = alice
            .send(&mut OsRng, &bob_address, text.as_bytes(), now())
            .await?;
        println!("   Alice -> Bob: {text}  (deposited: {})", sent.deposited);
    }
    show_relay(relay, &names).await;

    println!("\n== Bob comes back: reopens his store from disk and receives");
    let mut bob = open(dir, "bob", relay)?;
    let report = bob.receive(&mut OsRng, now()).await?;
    println!(
        "   received {}, redelivered {}, rejected {}, missing {:?}",
        report.received,
        report.redelivered,
        report.rejected.len(),
        report.missing
    );
    // What this example prints is also checked (CI runs it): a wrong claim
    // makes it exit with an error.
    if report.received != 3 || !report.rejected.is_empty() {
        return Err(format!("Bob received {} of Alice's 3 messages", report.received).into());
    }
    print_inbox(&mut bob, "Bob", &names)?;

    println!("\n== Both online: Alice waits on her mailbox while Bob replies");
    let ((received, arrived), (sent, sent_at)) = tokio::join!(
        async {
            let received = alice.receive_waiting(&mut OsRng, now(), 10_000).await;
            (received, Instant::now())
        },
        async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let sent_at = Instant::now();
            let sent = bob
                .send(
                    &mut OsRng,
                    &alice_address,
                    b"Hi Alice! Got all three.",
                    now(),
                )
                .await;
            (sent, sent_at)
        }
    );
    sent?;
    println!("   Bob -> Alice: Hi Alice! Got all three.");
    received?;
    println!(
        "   (in Alice's store {:?} after Bob started sending)",
        arrived.saturating_duration_since(sent_at)
    );
    print_inbox(&mut alice, "Alice", &names)?;
    show_relay(relay, &names).await;

    println!("\n== Safety number (compare out of band)");
    let (on_alice, on_bob) = (
        alice.safety_number(&bob_address)?,
        bob.safety_number(&alice_address)?,
    );
    println!("   Alice sees: {on_alice}");
    println!("   Bob sees:   {on_bob}");
    if on_alice != on_bob {
        return Err("the safety numbers differ".into());
    }
    Ok(())
}

/// The address's text form (`<identity hex>.<device number>`, its
/// `Display`) in `dir/NAME.address`.
fn write_address(dir: &Path, name: &str, address: &DeviceAddress) -> std::io::Result<()> {
    std::fs::write(dir.join(format!("{name}.address")), format!("{address}\n"))
}

/// Reads it back with `FromStr`, which refuses anything but the canonical
/// form of a valid identity key.
fn read_address(dir: &Path, name: &str) -> Option<DeviceAddress> {
    let text = std::fs::read_to_string(dir.join(format!("{name}.address"))).ok()?;
    text.trim_end().parse().ok()
}

/// One side, interactive: lines typed are sent to the peer, what arrives
/// is printed.
async fn one_side(relay: &HttpRelay, dir: &Path, me: &str) -> Result<(), Box<dyn Error>> {
    let peer = if me == "bob" { "alice" } else { "bob" };
    let mut device = open(dir, me, relay)?;
    if device.maintain_prekeys(&mut OsRng, now()).await? {
        println!("published prekeys");
    }
    write_address(dir, me, &device.address())?;
    println!(
        "{me} is {}.. (store {}); type lines to send to {peer}, Ctrl-D to quit",
        &hex(&device.address().identity)[..16],
        dir.join(format!("{me}.db")).display()
    );
    // Send whatever an earlier run could not deposit.
    let flushed = device.flush_outbox().await?;
    if flushed > 0 {
        println!("   (deposited {flushed} message(s) left from before)");
    }

    let (lines, mut typed) = mpsc::channel::<String>(16);
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if lines.blocking_send(line).is_err() {
                break;
            }
        }
    });

    enum Event {
        Line(Option<String>),
        Received(Result<(), Box<dyn Error>>),
    }
    let mut rng = OsRng;
    loop {
        // A receive cancelled by a typed line loses nothing: envelopes are
        // acknowledged only after they are committed to the store.
        let event = tokio::select! {
            line = typed.recv() => Event::Line(line),
            r = device.receive_waiting(&mut rng, now(), 25_000) => {
                Event::Received(r.map(drop).map_err(Into::into))
            }
        };
        match event {
            Event::Line(Some(line)) if line.trim().is_empty() => {}
            Event::Line(Some(line)) => match read_address(dir, peer) {
                Some(to) => {
                    let sent = device.send(&mut OsRng, &to, line.as_bytes(), now()).await?;
                    if !sent.deposited {
                        println!("   (the relay did not take it; it stays in the outbox)");
                    }
                }
                None => println!("   ({peer} has not started yet: nothing sent)"),
            },
            Event::Line(None) => {
                device.receive(&mut OsRng, now()).await?;
                print_messages(&mut device, dir, peer)?;
                return Ok(());
            }
            Event::Received(Err(e)) => {
                eprintln!("   (relay: {e}; retrying)");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Event::Received(Ok(())) => {}
        }
        print_messages(&mut device, dir, peer)?;
    }
}

fn print_messages(device: &mut Device, dir: &Path, peer: &str) -> Result<(), Box<dyn Error>> {
    let peer_address = read_address(dir, peer);
    for m in block_on(device.inbox())? {
        let from = if Some(m.from) == peer_address {
            peer.to_owned()
        } else {
            format!("{}..", &hex(&m.from.identity)[..16])
        };
        println!("[{from}] {}", String::from_utf8_lossy(&m.body));
        block_on(device.remove_from_inbox(&m.envelope_id))?;
    }
    Ok(())
}

struct Args {
    relay: Option<String>,
    side: Option<String>,
    dir: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        relay: None,
        side: None,
        dir: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value\n{USAGE}"));
        match flag.as_str() {
            "--relay" => args.relay = Some(value()?),
            "--as" => {
                let side = value()?;
                if side != "bob" && side != "alice" {
                    return Err(format!("--as takes bob or alice\n{USAGE}"));
                }
                args.side = Some(side);
            }
            "--dir" => args.dir = Some(PathBuf::from(value()?)),
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    if args.side.is_some() && args.relay.is_none() {
        return Err(format!(
            "--as needs --relay (both sides use the same relay)\n{USAGE}"
        ));
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };

    if let (Some(url), Some(side)) = (&args.relay, &args.side) {
        let dir = args
            .dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join("cubbyhole-chat"));
        std::fs::create_dir_all(&dir)?;
        let relay = HttpRelay::new(url)?;
        return one_side(&relay, &dir, side).await;
    }

    let dir = std::env::temp_dir().join(format!("cubbyhole-chat-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    println!("files in {}", dir.display());
    let mut server = None;
    let url = match &args.relay {
        Some(url) => url.clone(),
        None => {
            // A relay of our own, on a loopback port, with its SQLite file
            // next to the devices' stores.
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let url = format!("http://{}", listener.local_addr()?);
            let config = ServerConfig {
                storage: StorageConfig::Sqlite(dir.join("relay.db")),
                ..ServerConfig::unpriced()
            };
            let (stop, stopped) = oneshot::channel::<()>();
            let task = tokio::spawn(serve(listener, config, async move {
                let _ = stopped.await;
            }));
            server = Some((stop, task));
            url
        }
    };
    println!("relay at {url}");
    let relay = HttpRelay::new(&url)?;
    relay.health().await?;
    let result = demo(&relay, &dir).await;

    if let Some((stop, task)) = server {
        let _ = stop.send(());
        task.await??;
    }
    std::fs::remove_dir_all(&dir)?;
    result
}
