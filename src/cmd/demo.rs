//! `allot demo`: the gateway under overload, self-contained, in 20 seconds.
//!
//! Two synthetic back-end addresses (4 workers, 20 ms a request: 400 requests/s in all),
//! a gateway that lets 8 requests into service at once and puts premium clients (from
//! 127.0.0.2) ahead of basic ones, and a bounded load in which basic clients offer far more
//! than the back end can serve. Once a second it prints what each class offered, got and
//! waited; at the end, a summary.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use allot_gateway::stats::{ClassSnapshot, Status};
use allot_gateway::{server, Config, Gateway};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpSocket};
use tokio::time::Instant;

use super::backend::{self, Counters};

/// Flags of `allot demo` (none needed).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// How long the load runs, in seconds.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
}

const CONFIG: &str = r#"
[listener]
address = "127.0.0.1:0"

[admin]
address = "127.0.0.1:0"

[gateway]
max_running = 8            # the back end has 8 workers in all

[[backend]]
name = "app"
addresses = [BACKENDS]
balance = "least-in-flight"

[[class]]
name = "premium"
backend = "app"
priority = 10              # served first whenever a slot frees
max_wait_ms = 2000

[[class]]
name = "basic"
backend = "app"
queue_limit = 32           # more waiting than this is refused at once
max_wait_ms = 500          # and nobody waits longer than this

[[chain]]
name = "main"
default = { class = "basic" }

[[chain.rule]]
id = "premium-subnet"
source = ["127.0.0.2/32"]
target = { class = "premium" }
"#;

const PREMIUM_CLIENTS: usize = 8;
const BASIC_CLIENTS: usize = 96;
const PREMIUM_THINK: Duration = Duration::from_millis(50);
const BASIC_THINK: Duration = Duration::from_millis(60);

/// Runs the demonstration and prints its tables.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    super::runtime(Some(2))?.block_on(demo(Duration::from_secs(args.seconds.max(1))))?;
    Ok(ExitCode::SUCCESS)
}

async fn demo(length: Duration) -> anyhow::Result<()> {
    let mut addresses = Vec::new();
    for _ in 0..2 {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        addresses.push(format!("\"{}\"", l.local_addr()?));
        let args = backend::Args {
            listen: l.local_addr()?,
            workers: 4,
            service_ms: 20,
            ms_per_kib: 0.0,
            threads: 1,
            overload_after: 0,
            overload_factor: 0.0,
            cpu_ms: 0.0,
            window_ms: 100,
        };
        tokio::spawn(backend::serve(l, args, Arc::new(Counters::default())));
    }
    let text = CONFIG.replace("BACKENDS", &addresses.join(", "));
    let config = Config::parse(&text, "demo (embedded)")?;
    let listeners = server::bind_all(&config).await?;
    let target = listeners
        .first()
        .map(|l| l.local_addr())
        .transpose()?
        .ok_or_else(|| anyhow::anyhow!("the demo configuration has no listener"))?;
    let gw = Gateway::new(config)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut stop = stop_rx.clone();
    let serving = tokio::spawn(server::run(gw.clone(), listeners, None, async move {
        let _ = stop.wait_for(|s| *s).await;
    }));

    println!("allot demo: a gateway at {target} in front of two back-end addresses");
    println!(
        "  (4 workers each, 20 ms per request: about 400 requests/s in all; at most 8 in service)"
    );
    println!("  premium: {PREMIUM_CLIENTS} clients from 127.0.0.2, priority 10");
    println!(
        "  basic:   {BASIC_CLIENTS} clients from 127.0.0.1, offering about three times what is left\n"
    );

    let deadline = Instant::now() + length;
    let mut clients = Vec::new();
    let premium_ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let basic_ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
    for _ in 0..PREMIUM_CLIENTS {
        clients.push(tokio::spawn(client(
            target,
            premium_ip,
            PREMIUM_THINK,
            deadline,
        )));
    }
    for _ in 0..BASIC_CLIENTS {
        clients.push(tokio::spawn(client(
            target,
            basic_ip,
            BASIC_THINK,
            deadline,
        )));
    }

    println!(
        "{:>4}  {:<8} {:>10} {:>11} {:>10} {:>7} {:>10} {:>9}",
        "t", "class", "offered/s", "admitted/s", "refused/s", "queued", "delay ms", "p99 ms"
    );
    let start = gw.status();
    let mut last = start.clone();
    let mut tick = tokio::time::interval_at(
        Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    for second in 1..=length.as_secs() {
        tick.tick().await;
        let now = gw.status();
        for (c, before) in now.classes.iter().zip(&last.classes) {
            print_row(&format!("{second}s"), c, before, 1.0);
        }
        last = now;
    }
    for c in clients {
        let _ = c.await;
    }
    let _ = stop_tx.send(true);
    let _ = serving.await;

    let end = gw.status();
    summary(&start, &end, length.as_secs_f64());
    Ok(())
}

fn print_row(t: &str, c: &ClassSnapshot, before: &ClassSnapshot, seconds: f64) {
    let d = c.queue_delay.since(&before.queue_delay);
    println!(
        "{:>4}  {:<8} {:>10.0} {:>11.0} {:>10.0} {:>7} {:>10.1} {:>9.1}",
        t,
        c.name,
        (c.arrivals - before.arrivals) as f64 / seconds,
        (c.admitted - before.admitted) as f64 / seconds,
        (c.refused() - before.refused()) as f64 / seconds,
        c.queued,
        d.mean_ms(),
        d.quantile_ms(0.99)
    );
}

fn summary(start: &Status, end: &Status, seconds: f64) {
    println!("\nsummary over {seconds:.0} s (per second, and queueing delay over the whole run):");
    for (c, before) in end.classes.iter().zip(&start.classes) {
        print_row("all", c, before, seconds);
    }
    let delay = |name: &str| {
        end.classes
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.queue_delay.mean_ms())
            .unwrap_or(0.0)
    };
    let (p, b) = (delay("premium"), delay("basic"));
    if p > 0.0 {
        println!("\npremium waited {:.0}× less than basic ({p:.1} ms against {b:.1} ms), on the same back end.", b / p);
    } else {
        println!(
            "\npremium never waited; basic waited {b:.1} ms on average, on the same back end."
        );
    }
    println!("Try it on your own servers: `allot gateway --config examples/premium-basic.toml`.");
}

/// One closed-loop client: request, read the answer, think, repeat until the deadline.
async fn client(target: SocketAddr, source: IpAddr, think: Duration, deadline: Instant) {
    while Instant::now() < deadline {
        let Ok(socket) = TcpSocket::new_v4() else {
            return;
        };
        if socket.bind(SocketAddr::new(source, 0)).is_err() {
            return;
        }
        let Ok(Ok(stream)) =
            tokio::time::timeout(Duration::from_secs(2), socket.connect(target)).await
        else {
            tokio::time::sleep(think).await;
            continue;
        };
        let Ok((mut sender, conn)) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
        else {
            continue;
        };
        tokio::spawn(conn);
        while Instant::now() < deadline {
            let Ok(req) = http::Request::get("/")
                .header("host", "demo")
                .body(Empty::<Bytes>::new())
            else {
                return;
            };
            let Ok(resp) = sender.send_request(req).await else {
                break;
            };
            if resp.into_body().collect().await.is_err() {
                break;
            }
            tokio::time::sleep(think).await;
            if sender.ready().await.is_err() {
                break;
            }
        }
    }
}
