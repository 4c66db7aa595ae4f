//! Round-trip latency of the read-only methods, sequential calls through the
//! client library.
//!
//! ```text
//! kvm-manager-agent --transport unix:/tmp/kva.sock &
//! cargo run --release -p kvm-agent-client --example method_latency -- unix:/tmp/kva.sock 2000
//! ```
//!
//! Prints p50 and p99 per method, in microseconds. `cargo xtask bench` runs
//! the complete comparison with qemu-guest-agent; this is the quick check.

use std::time::{Duration, Instant};

use kvm_agent_client::protocol::methods::info::{GetInfoParams, GetMetricsParams};
use kvm_agent_client::{Client, ClientOptions, Target};

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let target: Target = args
        .next()
        .expect("usage: method_latency TARGET [ITERATIONS]")
        .parse()
        .expect("a target such as unix:/tmp/kva.sock");
    let n: usize = args
        .next()
        .map(|s| s.parse().expect("a count"))
        .unwrap_or(1000);
    let client = Client::connect(target, ClientOptions::default())
        .await
        .expect("connect");
    println!("{:<12} {:>10} {:>10}", "method", "p50 µs", "p99 µs");
    for method in ["ping", "get_info", "get_metrics", "get_users"] {
        let mut times = Vec::with_capacity(n);
        for _ in 0..n {
            let start = Instant::now();
            match method {
                "ping" => client.ping().await.map(drop),
                "get_info" => client.get_info(&GetInfoParams::default()).await.map(drop),
                "get_metrics" => client
                    .get_metrics(&GetMetricsParams::default())
                    .await
                    .map(drop),
                _ => client.get_users().await.map(drop),
            }
            .expect(method);
            times.push(start.elapsed());
        }
        times.sort();
        println!(
            "{method:<12} {:>10.1} {:>10.1}",
            percentile(&times, 0.5),
            percentile(&times, 0.99)
        );
    }
}
