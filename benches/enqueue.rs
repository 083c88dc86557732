//! Hot functions of the accept path, measured alone: body parsing, token lookup, signature
//! verification, and the durable store append (one request per flush, and many requests sharing
//! one flush through the writer thread's group commit). Run with `cargo bench --bench enqueue`.

use std::collections::HashMap;
use std::sync::mpsc;
use std::time::{Duration, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tickgate::ingress::signature::SignatureConfig;

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
    // The lookup the edge does per trigger: digest the path token, then a hash-map probe in a
    // map the size of a large deployment (TokenIndex holds the same shape behind an RwLock).
    let index: HashMap<[u8; 32], usize> = (0..10_000)
        .map(|i| {
            (
                token::digest(&format!("agent-token-{i:05}-padding-padding")),
                i,
            )
        })
        .collect();
    let known = "agent-token-04242-padding-padding".to_string();
    c.bench_function("token_lookup_10k_agents", |b| {
        b.iter(|| index.get(&token::digest(&known)).copied())
    });
}

fn signatures(c: &mut Criterion) {
    let body = payload();
    let secret = |_: &str| Some("It's a Secret to Everybody".to_string());
    let mut g = c.benchmark_group("signature_verify");
    g.throughput(Throughput::Bytes(body.len() as u64));
    for (scheme, header, value) in [
        (
            "github",
            "x-hub-signature-256",
            format!("sha256={}", hex(&mac(b"It's a Secret to Everybody", &body))),
        ),
        (
            "stripe",
            "stripe-signature",
            format!(
                "t={NOW},v1={}",
                hex(&mac(
                    b"It's a Secret to Everybody",
                    &[format!("{NOW}.").as_bytes(), &body].concat()
                ))
            ),
        ),
    ] {
        let config: SignatureConfig =
            serde_json::from_value(json!({"scheme": scheme, "secret_env": "S"})).unwrap();
        let verifier = config.build(&secret).unwrap();
        let now = UNIX_EPOCH + Duration::from_secs(NOW);
        let headers = move |name: &str| (name == header).then(|| value.clone());
        verifier.verify(&headers, &body, now).unwrap();
        g.bench_function(scheme, |b| {
            b.iter(|| verifier.verify(&headers, &body, now).unwrap())
        });
    }
    g.finish();
}

const NOW: u64 = 1_800_000_000;

fn mac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).unwrap();
    m.update(data);
    m.finalize().into_bytes().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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
                submit(&store, t, tx);
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
                    submit(&store, t, tx.clone());
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

/// Queues a submission whose outcome (stored or not) arrives on `done`.
fn submit(store: &SledStore, task: Task, done: mpsc::Sender<bool>) {
    store.write(
        Write::Submit {
            task: std::sync::Arc::new(task),
            idempotency: None,
        },
        Box::new(move |r| {
            let _ = done.send(r.is_ok());
        }),
    );
}

criterion_group!(benches, parsing, signatures, store_append);
criterion_main!(benches);
