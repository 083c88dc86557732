//! Hot functions of the accept path, measured alone: body parsing, token digest, and the durable
//! store append (one request per flush, and many requests sharing one flush through the writer
//! thread's group commit). Run with `cargo bench --bench enqueue`.

use std::sync::mpsc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use serde_json::json;
use tickgate::ingress::body;
use tickgate_actors::model::{Source, Task};
use tickgate_actors::store::sled::SledStore;
use tickgate_actors::store::{Store, Write};
use tickgate_actors::token;

fn payload() -> Vec<u8> {
    serde_json::to_vec(&json!({
        "ref": "refs/heads/main",
        "before": "9049f1265b7d61be4a8904a9a27120d2064dab3b",
        "after": "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c",
        "repository": {"full_name": "octo/hello", "private": false},
        "pusher": {"name": "octocat", "email": "octocat@example.com"},
        "title": "push to main",
    }))
    .unwrap()
}

fn parsing(c: &mut Criterion) {
    let body = payload();
    let mut g = c.benchmark_group("ingress");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("parse_json_body", |b| {
        b.iter(|| body::parse(Some("application/json"), &body).unwrap())
    });
    g.finish();
    let tok = token::generate();
    c.bench_function("token_digest", |b| b.iter(|| token::digest(&tok)));
}

fn store_append(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let agent: tickgate_actors::model::AgentId = "bench".parse().unwrap();
    let inputs: serde_json::Value = serde_json::from_slice(&payload()).unwrap();
    let task = || Task::new(agent.clone(), inputs.clone(), Source::default());

    let mut g = c.benchmark_group("store_append");
    g.sample_size(20);
    g.throughput(Throughput::Elements(1));
    g.bench_function("one_request_per_flush", |b| {
        b.iter_batched(
            task,
            |t| {
                let (tx, rx) = mpsc::channel();
                store.write(
                    Write::Submit {
                        task: t,
                        idempotency: None,
                    },
                    Box::new(move |r| {
                        let _ = tx.send(r.is_ok());
                    }),
                );
                assert!(rx.recv().unwrap());
            },
            BatchSize::SmallInput,
        )
    });
    const BURST: usize = 64;
    g.throughput(Throughput::Elements(BURST as u64));
    g.bench_function("64_concurrent_requests_group_commit", |b| {
        b.iter_batched(
            || (0..BURST).map(|_| task()).collect::<Vec<_>>(),
            |tasks| {
                let (tx, rx) = mpsc::channel();
                for t in tasks {
                    let tx = tx.clone();
                    store.write(
                        Write::Submit {
                            task: t,
                            idempotency: None,
                        },
                        Box::new(move |r| {
                            let _ = tx.send(r.is_ok());
                        }),
                    );
                }
                for _ in 0..BURST {
                    assert!(rx.recv().unwrap());
                }
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, parsing, store_append);
criterion_main!(benches);
