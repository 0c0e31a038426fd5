//! The load and the servers of `bench/tcp.sh`: a TCP source server (sends bytes as fast as
//! the client reads), an echo server (answers each connection's byte and closes), a bulk
//! client (MB/s through a proxy over N connections) and a short-connection client
//! (connections per second, each: connect, send a byte, read the answer, close).
//!
//!   tcp_load source ADDR          # serve bytes forever to every connection
//!   tcp_load echo ADDR            # answer one byte per connection, then close
//!   tcp_load bulk TARGET SECS N   # prints MB/s
//!   tcp_load short TARGET SECS N  # prints connections/s

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn usage() -> ! {
    eprintln!("usage: tcp_load source|echo ADDR | bulk|short TARGET SECS CONNECTIONS");
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tcp_load: cannot start a runtime: {e}");
            std::process::exit(1)
        }
    };
    let addr = |i: usize| -> SocketAddr {
        args.get(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| usage())
    };
    let num = |i: usize| -> u64 {
        args.get(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| usage())
    };
    match args.first().map(String::as_str) {
        Some("source") => rt.block_on(serve(addr(1), true)),
        Some("echo") => rt.block_on(serve(addr(1), false)),
        Some("bulk") => {
            let mbs = rt.block_on(bulk(addr(1), Duration::from_secs(num(2)), num(3) as usize));
            println!("{mbs:.1}");
        }
        Some("short") => {
            let cps = rt.block_on(short(addr(1), Duration::from_secs(num(2)), num(3) as usize));
            println!("{cps:.0}");
        }
        _ => usage(),
    }
}

async fn serve(addr: SocketAddr, source: bool) {
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("tcp_load: cannot listen on {addr}: {e}");
            std::process::exit(1)
        }
    };
    println!(
        "listening backend={}",
        listener.local_addr().unwrap_or(addr)
    );
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            continue;
        };
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            if source {
                let chunk = vec![b'x'; 64 * 1024];
                while s.write_all(&chunk).await.is_ok() {}
            } else {
                let mut b = [0u8; 1];
                if s.read_exact(&mut b).await.is_ok() {
                    let _ = s.write_all(&b).await;
                }
            }
        });
    }
}

async fn bulk(target: SocketAddr, length: Duration, connections: usize) -> f64 {
    let total = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let total = Arc::clone(&total);
        tasks.push(tokio::spawn(async move {
            let Ok(mut s) = TcpStream::connect(target).await else {
                return;
            };
            let mut buf = vec![0u8; 64 * 1024];
            while start.elapsed() < length {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        total.fetch_add(n as u64, Relaxed);
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    total.load(Relaxed) as f64 / 1e6 / start.elapsed().as_secs_f64()
}

async fn short(target: SocketAddr, length: Duration, concurrency: usize) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let done = Arc::clone(&done);
        tasks.push(tokio::spawn(async move {
            while start.elapsed() < length {
                let Ok(mut s) = TcpStream::connect(target).await else {
                    continue;
                };
                let _ = s.set_nodelay(true);
                let mut b = [7u8; 1];
                if s.write_all(&b).await.is_ok() && s.read_exact(&mut b).await.is_ok() {
                    done.fetch_add(1, Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    done.load(Relaxed) as f64 / start.elapsed().as_secs_f64()
}
