//! The admin task listing over a large store: the first page, a page deep in a cursor walk, and
//! a status-filtered page whose matches are sparse (bounded by the scan limit). The store holds
//! `TICKGATE_BENCH_TASKS` tasks (default 200 000) of two agents, 1 % of them FAILURE.
//! Run with `cargo bench --bench listing`.

use std::sync::mpsc;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::json;
use tickgate_actors::model::{AgentId, Source, Task, TaskStatus};
use tickgate_actors::store::sled::SledStore;
use tickgate_actors::store::{ListCursor, ListQuery, Store, Write};

fn populate(store: &SledStore, n: usize) -> ListCursor {
    let agents: [AgentId; 2] = ["a".parse().unwrap(), "b".parse().unwrap()];
    let (tx, rx) = mpsc::channel();
    for i in 0..n {
        let mut task = Task::new(
            agents[i % 2].clone(),
            json!({"i": i, "ref": "refs/heads/main"}),
            Source::default(),
        );
        task.created_at = 1_700_000_000_000 + i as u64;
        if i % 100 == 0 {
            task.status = TaskStatus::Failure;
        }
        let tx = tx.clone();
        store.write(
            Write::Submit {
                task: std::sync::Arc::new(task),
                idempotency: None,
            },
            Box::new(move |r| tx.send(r).unwrap()),
        );
    }
    for _ in 0..n {
        rx.recv().unwrap().unwrap();
    }
    // A cursor halfway down, as a deep walk would hold it.
    let page = store
        .list_tasks_blocking(&ListQuery {
            until_ms: Some(1_700_000_000_000 + n as u64 / 2),
            limit: 1,
            scan_limit: 1,
            ..ListQuery::default()
        })
        .unwrap();
    page.next_cursor.expect("a cursor halfway down")
}

fn listing(c: &mut Criterion) {
    let n: usize = std::env::var("TICKGATE_BENCH_TASKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let deep = populate(&store, n);
    let store: Arc<SledStore> = store;
    let q = |limit: usize| ListQuery {
        limit,
        scan_limit: 5000,
        ..ListQuery::default()
    };
    let mut group = c.benchmark_group(format!("listing_{n}_tasks"));
    group.sample_size(20);
    group.bench_function("first_page_100", |b| {
        b.iter(|| store.list_tasks_blocking(&q(100)).unwrap())
    });
    group.bench_function("deep_cursor_page_100", |b| {
        b.iter(|| {
            store
                .list_tasks_blocking(&ListQuery {
                    cursor: Some(deep),
                    ..q(100)
                })
                .unwrap()
        })
    });
    group.bench_function("agent_page_100", |b| {
        b.iter(|| {
            store
                .list_tasks_blocking(&ListQuery {
                    agent: Some("b".parse().unwrap()),
                    ..q(100)
                })
                .unwrap()
        })
    });
    group.bench_function("failure_filter_page_100_scan_5000", |b| {
        b.iter(|| {
            store
                .list_tasks_blocking(&ListQuery {
                    status: Some(TaskStatus::Failure),
                    ..q(100)
                })
                .unwrap()
        })
    });
    group.finish();
    store.close().unwrap();
}

criterion_group!(benches, listing);
criterion_main!(benches);
