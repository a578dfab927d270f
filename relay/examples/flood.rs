//! A connection flood against a relay on loopback, measuring the relay's
//! memory (RSS, from `/proc/PID/status`) before, during and after, and the
//! latency of honest requests during the flood.
//!
//! ```text
//! cubbyhole-relay --memory --listen 127.0.0.1:8080 &
//! cargo run --release -p cubbyhole-relay --example flood -- \
//!     --addr 127.0.0.1:8080 --pid $! --connections 20000 --sources 64
//! ```
//!
//! Each flooding connection comes from one of `--sources` loopback
//! addresses (127.0.1.1, 127.0.1.2, ...), sends the head of a deposit
//! announcing a 200 KiB body and 16 KiB of it, then nothing (a slowly sent
//! body), and is held for `--hold-secs`. Meanwhile an honest client on
//! 127.0.0.1 asks `GET /v1/health` on a new connection every 100 ms. Then
//! every flooding connection is closed and the RSS followed for
//! `--after-secs`. Loopback only; Linux only (RSS).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

struct Options {
    addr: SocketAddr,
    pid: u32,
    connections: usize,
    sources: u8,
    hold: Duration,
    after: Duration,
}

fn parse() -> Result<Options, String> {
    let mut options = Options {
        addr: "127.0.0.1:8080".parse().unwrap(),
        pid: 0,
        connections: 20_000,
        sources: 64,
        hold: Duration::from_secs(10),
        after: Duration::from_secs(20),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        let bad = |_| format!("{flag}: {value:?}");
        match flag.as_str() {
            "--addr" => options.addr = value.parse().map_err(|_| bad(()))?,
            "--pid" => options.pid = value.parse().map_err(|_| bad(()))?,
            "--connections" => options.connections = value.parse().map_err(|_| bad(()))?,
            "--sources" => options.sources = value.parse().map_err(|_| bad(()))?,
            "--hold-secs" => {
                options.hold = Duration::from_secs(value.parse().map_err(|_| bad(()))?)
            }
            "--after-secs" => {
                options.after = Duration::from_secs(value.parse().map_err(|_| bad(()))?)
            }
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    if !options.addr.ip().is_loopback() {
        return Err("--addr: loopback only".into());
    }
    if options.pid == 0 || options.sources == 0 {
        return Err("--pid and --sources > 0 are needed".into());
    }
    Ok(options)
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// One honest request on a new connection: its latency, or `None` when
/// it got no `200`.
async fn honest(addr: SocketAddr) -> Option<Duration> {
    let started = Instant::now();
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        stream
            .write_all(b"GET /v1/health HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.ok()?;
        answer.starts_with(b"HTTP/1.1 200").then_some(())
    };
    match tokio::time::timeout(Duration::from_secs(30), attempt).await {
        Ok(Some(())) => Some(started.elapsed()),
        _ => None,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let options = parse()?;
    #[cfg(unix)]
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let pid = options.pid;
    let baseline = rss_mib(pid);
    println!("relay RSS before: {baseline:.1} MiB");

    // The honest client, until told to stop.
    let stop = Arc::new(tokio::sync::Notify::new());
    let honest_task = {
        let (addr, stop) = (options.addr, Arc::clone(&stop));
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut failures = 0usize;
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    _ = stop.notified() => break,
                    _ = tick.tick() => {}
                }
                match honest(addr).await {
                    Some(latency) => latencies.push(latency),
                    None => failures += 1,
                }
            }
            (latencies, failures)
        })
    };

    // The flood.
    let head = format!(
        "POST /v1/mailboxes/{}/envelopes HTTP/1.1\r\nHost: relay\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: 204800\r\n\r\n",
        "ab".repeat(32)
    );
    let mut first = head.into_bytes();
    first.extend_from_slice(&[0x01; 16 * 1024]);
    let first = Arc::new(first);
    let opened = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let limit = Arc::new(tokio::sync::Semaphore::new(512));
    let mut held = Vec::with_capacity(options.connections);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..options.connections {
        let permit = Arc::clone(&limit).acquire_owned().await.unwrap();
        let source = IpAddr::V4(Ipv4Addr::new(
            127,
            0,
            1,
            1 + (i % options.sources as usize) as u8,
        ));
        let (addr, first) = (options.addr, Arc::clone(&first));
        let (opened, refused) = (Arc::clone(&opened), Arc::clone(&refused));
        tasks.spawn(async move {
            let _permit = permit;
            let socket = TcpSocket::new_v4().ok()?;
            socket.bind(SocketAddr::new(source, 0)).ok()?;
            let mut stream = socket.connect(addr).await.ok()?;
            if stream.write_all(&first).await.is_err() {
                refused.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            opened.fetch_add(1, Ordering::Relaxed);
            Some(stream)
        });
        while let Some(done) = tasks.try_join_next() {
            if let Ok(Some(stream)) = done {
                held.push(stream);
            }
        }
    }
    while let Some(done) = tasks.join_next().await {
        if let Ok(Some(stream)) = done {
            held.push(stream);
        }
    }
    println!(
        "flood: {} connections opened in {:.1} s ({} writes refused)",
        opened.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64(),
        refused.load(Ordering::Relaxed)
    );
    // How many the relay still holds open after a moment (the others were
    // answered and closed).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut alive = 0;
    let mut probe = [0u8; 1];
    for stream in &held {
        if matches!(stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        {
            alive += 1;
        }
    }
    println!("held open by the relay: {alive}");
    let mut peak = rss_mib(pid);
    let hold_until = Instant::now() + options.hold;
    while Instant::now() < hold_until {
        tokio::time::sleep(Duration::from_millis(500)).await;
        peak = peak.max(rss_mib(pid));
    }
    println!("relay RSS during the flood: peak {peak:.1} MiB");
    drop(held);
    stop.notify_one();
    let (mut latencies, failures) = honest_task.await.unwrap();
    latencies.sort();
    println!(
        "honest requests during the flood: {} answered, {} failed; latency p50 {:.1} ms, \
         p99 {:.1} ms, max {:.1} ms",
        latencies.len(),
        failures,
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        percentile(&latencies, 1.0)
    );
    let closed = Instant::now();
    let mut marks = vec![1u64, 5, 10, 20, 30, 60];
    marks.retain(|s| Duration::from_secs(*s) <= options.after);
    for mark in marks {
        let at = closed + Duration::from_secs(mark);
        tokio::time::sleep_until(at.into()).await;
        println!("relay RSS {mark} s after: {:.1} MiB", rss_mib(pid));
    }
    Ok(())
}
