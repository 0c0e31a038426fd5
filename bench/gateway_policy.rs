//! Cost of the gateway's per-request policy decisions (allot-model): classification, a
//! queue push and pop under each policy, a dispatcher pick, a token-bucket take.
//!
//! Run: `cargo bench --bench gateway_policy`.

use allot_model::bucket::TokenBucket;
use allot_model::classify::{ChainSpec, HeaderList, RequestFacts, RuleSet};
use allot_model::dispatch::{ClassWeights, Dispatcher};
use allot_model::queue::{ClassQueue, Policy, QueueConfig};
use allot_model::Nanos;
use criterion::{criterion_group, criterion_main, Criterion};
use serde::Deserialize;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

/// A premium/basic split by subnet, a virtual host, and eight content rules, one of which
/// matches the benchmark request near the end.
const RULES: &str = r#"
[[chain]]
name = "main"
default = { class = "basic" }
[[chain.rule]]
id = "premium-net"
source = ["10.0.0.0/8", "2001:db8::/32"]
target = { class = "premium" }
[[chain.rule]]
id = "vhost"
host = "*.api.example.com"
target = { chain = "api" }
[[chain.rule]]
id = "bot1"
header = { name = "User-Agent", contains = "Googlebot" }
target = { class = "bot" }
[[chain.rule]]
id = "bot2"
header = { name = "User-Agent", contains = "bingbot" }
target = { class = "bot" }
[[chain.rule]]
id = "bot3"
header = { name = "User-Agent", contains = "curl/" }
target = { class = "bot" }
[[chain.rule]]
id = "bot4"
header = { name = "User-Agent", contains = "python-requests" }
target = { class = "bot" }
[[chain.rule]]
id = "gold"
header = { name = "Cookie", contains = "tier=gold" }
target = { class = "premium" }
[[chain.rule]]
id = "silver"
header = { name = "Cookie", contains = "tier=silver" }
target = { class = "basic" }
[[chain.rule]]
id = "mobile"
header = { name = "User-Agent", contains = "Mobile" }
target = { class = "mobile" }
[[chain.rule]]
id = "sample"
probability = 0.1
target = { class = "sample" }

[[chain]]
name = "api"
default = { class = "basic" }
[[chain.rule]]
id = "v2"
path_prefix = "/v2/"
target = { class = "premium" }
"#;

#[derive(Deserialize)]
struct Rules {
    chain: Vec<ChainSpec>,
}

fn classify(c: &mut Criterion) {
    let rules: Rules = match toml::from_str(RULES) {
        Ok(r) => r,
        Err(e) => panic!("benchmark rules: {e}"),
    };
    let classes = ["premium", "basic", "bot", "mobile", "sample"]
        .map(String::from)
        .to_vec();
    let set = match RuleSet::from_specs(rules.chain, "main", classes) {
        Ok(s) => s,
        Err(e) => panic!("benchmark rules: {e}"),
    };
    let headers = [
        ("Host", "www.example.com"),
        (
            "User-Agent",
            "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) Mobile/15E148",
        ),
        ("Accept", "text/html,application/xhtml+xml"),
        ("Cookie", "session=0123456789abcdef; theme=dark"),
    ];
    let headers = HeaderList(&headers);
    let req = RequestFacts {
        client: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 44)),
        host: Some("www.example.com"),
        path: "/index.html",
        headers: &headers,
        listener: None,
        first_bytes: b"",
    };
    c.bench_function(
        "classify/11 rules, 8 header strings, match at rule 9",
        |b| b.iter(|| black_box(set.classify(black_box(&req), &mut || 0.5))),
    );
    let premium = RequestFacts {
        client: IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)),
        ..req
    };
    c.bench_function("classify/match at rule 1 (subnet)", |b| {
        b.iter(|| black_box(set.classify(black_box(&premium), &mut || 0.5)))
    });
}

fn queues(c: &mut Criterion) {
    for policy in [
        Policy::Fifo,
        Policy::ShortestFirst,
        Policy::Locality,
        Policy::Share,
    ] {
        let mut q = ClassQueue::new(QueueConfig {
            policy,
            limit: 10_000,
            age_bound: Duration::from_secs(5),
        });
        let paths: Vec<String> = (0..64).map(|i| format!("/file/{i}")).collect();
        for (i, p) in paths.iter().enumerate() {
            q.observe_size(p, 1000 * (i as u64 + 1));
        }
        let flow = |i: u64| IpAddr::V4(Ipv4Addr::new(10, 0, (i % 7) as u8, (i % 13) as u8));
        let mut i = 0u64;
        // A steady backlog of 100 waiting requests.
        for _ in 0..100 {
            i += 1;
            let _ = q.push(i, &paths[(i % 64) as usize], flow(i), Nanos(i));
        }
        c.bench_function(&format!("queue/{policy:?} push+pop at depth 100"), |b| {
            b.iter(|| {
                i += 1;
                let _ = q.push(i, &paths[(i * 7 % 64) as usize], flow(i), Nanos(i));
                black_box(q.pop(Nanos(i)))
            })
        });
    }
}

fn dispatch_and_bucket(c: &mut Criterion) {
    let mut d = Dispatcher::new(vec![
        ClassWeights {
            priority: 1,
            ratio: 1.0,
        },
        ClassWeights {
            priority: 0,
            ratio: 1.0,
        },
        ClassWeights {
            priority: 0,
            ratio: 3.0,
        },
        ClassWeights {
            priority: 0,
            ratio: 0.5,
        },
    ]);
    c.bench_function("dispatch/pick among 4 classes", |b| {
        b.iter(|| black_box(d.pick(&mut |c| c != 0)))
    });
    let mut bucket = TokenBucket::new(1e6, 1e6, Nanos::ZERO);
    let mut t = 0u64;
    c.bench_function("bucket/try_take", |b| {
        b.iter(|| {
            t += 1_000;
            black_box(bucket.try_take(1.0, Nanos(t)))
        })
    });
}

criterion_group!(benches, classify, queues, dispatch_and_bucket);
criterion_main!(benches);
