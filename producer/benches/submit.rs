//! Bulk submit throughput against the AWS emulator, next to raw `SendMessageBatch` loops
//! with the same bodies on the same emulator in the same run.
//!
//! `cargo bench -p agentq-producer --bench submit` (N specs per run: `AGENTQ_BENCH_N`,
//! default 500; rounds: `AGENTQ_BENCH_ROUNDS`, default 3). The queue is drained (and its
//! count checked) after every run, so every run starts at depth 0 and ends at depth N: the
//! emulator's SQS slows down as queues get deeper, so the depth is part of the result.
//!
//! Modes:
//! - `raw SendMessageBatch, 1 in flight`: a plain loop, 10 bodies per call;
//! - `raw SendMessageBatch, 8 in flight`: the same calls, 8 concurrent;
//! - `records only (PutItem)`: the producer's conditional PutItem per job, 32 concurrent;
//! - `agentq submit_batch`: the producer (records first, then batches, 8 in flight).

use std::time::{Duration, Instant};

use agentq_core::record::now_ms;
use agentq_core::spec::{JobSpec, ValidationContext};
use agentq_core::{JobStore, ValidSpec};
use agentq_producer::{Producer, ProducerOptions, SubmitOptions};
use agentq_testkit::{Resources, resources};
use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
use futures::StreamExt;

fn specs(run: &str, n: usize) -> Vec<ValidSpec> {
    (0..n)
        .map(|i| {
            let json = format!(
                r#"{{"spec_version":1,"job_id":"{run}-{i}","agent":"command","command":["echo","job {i}"],"labels":{{"bench":"{run}"}}}}"#
            );
            JobSpec::parse_valid(json.as_bytes(), &ValidationContext::default()).expect("spec")
        })
        .collect()
}

async fn raw(r: &Resources, bodies: &[String], in_flight: usize) {
    let sqs = r.clients().sqs;
    futures::stream::iter(bodies.chunks(10))
        .map(|chunk| {
            let sqs = sqs.clone();
            async move {
                let entries = chunk
                    .iter()
                    .enumerate()
                    .map(|(i, b)| {
                        SendMessageBatchRequestEntry::builder()
                            .id(i.to_string())
                            .message_body(b)
                            .build()
                            .expect("entry")
                    })
                    .collect();
                let out = sqs
                    .send_message_batch()
                    .queue_url(&r.queue_url)
                    .set_entries(Some(entries))
                    .send()
                    .await
                    .expect("send batch");
                assert!(out.failed().is_empty(), "{:?}", out.failed());
            }
        })
        .buffer_unordered(in_flight)
        .collect::<Vec<_>>()
        .await;
}

async fn records(r: &Resources, specs: &[ValidSpec]) {
    let store = JobStore::new(r.clients().dynamodb, &r.table);
    futures::stream::iter(specs)
        .map(|s| {
            let store = store.clone();
            async move { store.create_queued(s, now_ms()).await.expect("put") }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
}

async fn drain(r: &Resources, expected: usize) {
    let got = r.drain(&r.queue_url).await.len();
    assert_eq!(
        got, expected,
        "queue held {got} messages, expected {expected}"
    );
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs us too: keep that quick.
    let quick = !std::env::args().any(|a| a == "--bench");
    let n: usize = std::env::var("AGENTQ_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 20 } else { 500 });
    let rounds: usize = std::env::var("AGENTQ_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 1 } else { 3 });
    let r = resources().await;
    let producer = Producer::new(r.clients(), r.settings()).with_options(ProducerOptions {
        send_concurrency: 8,
        ..ProducerOptions::default()
    });
    let modes = [
        "raw SendMessageBatch, 1 in flight",
        "raw SendMessageBatch, 8 in flight",
        "records only (PutItem, 32 in flight)",
        "agentq submit_batch (8 in flight)",
    ];
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); modes.len()];
    let mut body_bytes = 0usize;
    for round in 0..rounds {
        for (m, _) in modes.iter().enumerate() {
            let run = format!("r{round}m{m}-{}", agentq_testkit::unique("b"));
            let specs = specs(&run, n);
            let bodies: Vec<String> = specs.iter().map(ValidSpec::to_json).collect();
            body_bytes = bodies.iter().map(String::len).sum::<usize>() / n.max(1);
            let t = Instant::now();
            match m {
                0 => raw(&r, &bodies, 1).await,
                1 => raw(&r, &bodies, 8).await,
                2 => records(&r, &specs).await,
                _ => {
                    let report = producer
                        .submit_batch(specs, &SubmitOptions::default(), &|_| {})
                        .await
                        .expect("batch");
                    assert_eq!(report.failed(), 0, "{:?}", report.entries.first());
                }
            }
            times[m].push(t.elapsed());
            drain(&r, if m == 2 { 0 } else { n }).await;
        }
    }
    println!(
        "\nbulk submit of {n} specs (~{body_bytes} bytes each), {rounds} round(s), emulator at {}",
        r.endpoint
    );
    println!("queue depth: 0 at the start of every run, {n} at its end (drained between runs)\n");
    println!(
        "{:<40} {:>10} {:>10} {:>12}",
        "mode", "median", "best", "msgs/s (med)"
    );
    for (m, name) in modes.iter().enumerate() {
        let mut t = times[m].clone();
        t.sort();
        let med = t[t.len() / 2];
        println!(
            "{:<40} {:>9.2}s {:>9.2}s {:>12.0}",
            name,
            med.as_secs_f64(),
            t[0].as_secs_f64(),
            n as f64 / med.as_secs_f64()
        );
    }
}
