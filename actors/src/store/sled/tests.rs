//! The sled store's tests. Most go through the handle and each covers several of the parts at
//! once (a submit is staged, queued, listed and read back), so they are kept together rather than
//! beside any one part; the few that stage a batch by hand reach `stage` and the key builders.

use std::collections::HashMap;

use super::listed::{list_agent_prefix, listing_key};
use super::queued::{queue_key, queue_prefix};
use super::reads::{read_deliveries, read_disabled_endpoints, read_due_awaits};
use super::stage::stage;
use super::staged::Staged;
use super::tasks::{legacy_state_key, put_task, state_key, task_key, Part};
use super::*;
use crate::model::{Source, TaskStatus};
use crate::store::{listing, queue, record};
use crate::store::{write_async, CancelOutcome, IdempotencyKey};

/// Opens a store again in the same process, right after `close`: waits out the file lock
/// like the writer's own reopen does (see [`open_waiting`]).
fn reopen_opts(path: &Path, options: impl Fn() -> Options) -> Arc<SledStore> {
    open_waiting(REOPEN_WAIT, || SledStore::open_opts(path, options())).expect("reopen")
}

fn reopen(path: &Path) -> Arc<SledStore> {
    reopen_opts(path, Options::default)
}

fn blocking(store: &SledStore, write: Write) -> Result<Written, StoreError> {
    let (tx, rx) = std::sync::mpsc::channel();
    store.write(
        write,
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    rx.recv().unwrap()
}

fn task(agent: &AgentId) -> Task {
    Task::new(
        agent.clone(),
        serde_json::json!({"n": 1}),
        Source::default(),
    )
}

#[test]
fn submit_assigns_increasing_seq_and_queues_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let agent: AgentId = "a".parse().unwrap();
    let mut ids = Vec::new();
    for _ in 0..5 {
        match blocking(
            &store,
            Write::Submit {
                task: Arc::new(task(&agent)),
                idempotency: None,
            },
        )
        .unwrap()
        {
            Written::Accepted(t) => ids.push((t.seq, t.id)),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(ids.windows(2).all(|w| w[0].0 < w[1].0));
    let queued: Vec<TaskId> = store.queued_blocking(&agent).unwrap();
    assert_eq!(queued, ids.iter().map(|x| x.1).collect::<Vec<_>>());
}

#[test]
fn retry_parks_the_task_behind_a_timer_that_requeues_it_once_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let agent: AgentId = "a".parse().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let Written::Accepted(t) = blocking(
        &store,
        Write::Submit {
            task: Arc::new(task(&agent)),
            idempotency: None,
        },
    )
    .unwrap() else {
        panic!("accepted")
    };
    let mut t = Arc::unwrap_or_clone(t);
    t.status = TaskStatus::Retry;
    t.next_attempt_at = Some(1234);
    let state = AgentState {
        memory: serde_json::json!({}),
        ticks: 1,
    };
    blocking(
        &store,
        Write::Retry {
            task: Arc::new(t.clone()),
            state: state.clone(),
        },
    )
    .unwrap();
    assert!(
        store.queued_blocking(&agent).unwrap().is_empty(),
        "a waiting retry is not queued"
    );
    assert_eq!(store.agent_state_blocking(&agent).unwrap(), state);
    store.close().unwrap();
    drop(store);
    let store = reopen(dir.path());
    let timers = store.retry_timers_blocking().unwrap();
    assert_eq!(
        timers,
        vec![RetryTimer {
            due_ms: 1234,
            task: t.id,
            agent: agent.clone()
        }]
    );
    // A timer for another due time is stale: it only goes.
    let stale = Write::RetryDue {
        task: t.id,
        due_ms: 99,
    };
    assert_eq!(blocking(&store, stale).unwrap(), Written::Done);
    let due = Write::RetryDue {
        task: t.id,
        due_ms: 1234,
    };
    let Written::Accepted(requeued) = blocking(&store, due.clone()).unwrap() else {
        panic!("requeued")
    };
    assert_eq!(requeued.status, TaskStatus::Pending);
    assert_eq!(requeued.next_attempt_at, None);
    assert_eq!(store.queued_blocking(&agent).unwrap(), vec![t.id]);
    assert!(store.retry_timers_blocking().unwrap().is_empty());
    // Firing twice requeues once.
    assert_eq!(blocking(&store, due).unwrap(), Written::Done);
    assert_eq!(store.queued_blocking(&agent).unwrap(), vec![t.id]);
}

#[test]
fn park_resume_and_expire_are_conditional_and_move_queue_and_timer() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let agent: AgentId = "a".parse().unwrap();
    let accepted = match blocking(
        &store,
        Write::Submit {
            task: Arc::new(task(&agent)),
            idempotency: None,
        },
    )
    .unwrap()
    {
        Written::Accepted(t) => Arc::unwrap_or_clone(t),
        other => panic!("unexpected {other:?}"),
    };
    let id = accepted.id;
    let mut parked = accepted.clone();
    crate::awaiting::park(
        &mut parked,
        serde_json::json!("q"),
        Duration::from_millis(10),
        1_000,
    );
    blocking(
        &store,
        Write::Park {
            task: Arc::new(parked.clone()),
            state: AgentState::default(),
        },
    )
    .unwrap();
    assert!(store.queued_blocking(&agent).unwrap().is_empty());
    assert_eq!(
        read_due_awaits(&store.shared, 1_010, 10).unwrap(),
        vec![(1_010, id)]
    );
    assert!(read_due_awaits(&store.shared, 1_009, 10)
        .unwrap()
        .is_empty());

    // Two answers queued back to back (usually one batch): the first wins, the second
    // sees its result.
    let (tx, rx) = std::sync::mpsc::channel();
    for n in 0..2 {
        let tx = tx.clone();
        store.write(
            Write::Resume {
                id,
                response: serde_json::json!(n),
            },
            Box::new(move |r| tx.send(r).unwrap()),
        );
    }
    let first = rx.recv().unwrap().unwrap();
    let second = rx.recv().unwrap().unwrap();
    let Written::Updated(resumed) = first else {
        panic!("{first:?}")
    };
    assert_eq!(resumed.status, TaskStatus::Pending);
    assert_eq!(
        resumed.resume.as_ref().unwrap().response,
        serde_json::json!(0)
    );
    assert!(resumed.seq > accepted.seq, "queued behind what was queued");
    assert!(matches!(second, Written::Unchanged(Some(t)) if t.status == TaskStatus::Pending));
    assert_eq!(store.queued_blocking(&agent).unwrap(), vec![id]);
    assert!(read_due_awaits(&store.shared, u64::MAX - 1, 10)
        .unwrap()
        .is_empty());

    // A stale timer changes nothing; the answered task stays PENDING.
    let stale = blocking(
        &store,
        Write::Expire {
            id,
            expires_at: 1_010,
        },
    )
    .unwrap();
    assert!(matches!(stale, Written::Unchanged(Some(_))), "{stale:?}");
    assert_eq!(
        store.task_blocking(id).unwrap().unwrap().status,
        TaskStatus::Pending
    );
    let unknown = TaskId::random();
    assert_eq!(
        blocking(
            &store,
            Write::Expire {
                id: unknown,
                expires_at: 1
            }
        )
        .unwrap(),
        Written::Unchanged(None)
    );

    // Parked again, its own timer fails it and files it for retention.
    let mut again = resumed.as_ref().clone();
    crate::awaiting::park(
        &mut again,
        serde_json::json!("q2"),
        Duration::from_millis(5),
        2_000,
    );
    blocking(
        &store,
        Write::Park {
            task: Arc::new(again),
            state: AgentState::default(),
        },
    )
    .unwrap();
    let expired = blocking(
        &store,
        Write::Expire {
            id,
            expires_at: 2_005,
        },
    )
    .unwrap();
    let Written::Updated(failed) = expired else {
        panic!("{expired:?}")
    };
    assert_eq!(failed.status, TaskStatus::Failure);
    assert_eq!(failed.error.as_deref(), Some(crate::awaiting::TIMED_OUT));
    assert!(read_due_awaits(&store.shared, u64::MAX - 1, 10)
        .unwrap()
        .is_empty());
    assert!(matches!(
        blocking(
            &store,
            Write::Resume {
                id,
                response: serde_json::json!(1)
            }
        )
        .unwrap(),
        Written::Unchanged(Some(_))
    ));
}

#[test]
fn idempotency_detects_duplicates_and_conflicts_even_within_one_batch() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let agent: AgentId = "a".parse().unwrap();
    let idem = |body: u8| IdempotencyKey {
        key: "k1".into(),
        body_sha256: [body; 32],
    };
    let (tx, rx) = std::sync::mpsc::channel();
    for body in [1u8, 1, 2] {
        let tx = tx.clone();
        store.write(
            Write::Submit {
                task: Arc::new(task(&agent)),
                idempotency: Some(idem(body)),
            },
            Box::new(move |r| tx.send(r).unwrap()),
        );
    }
    let results: Vec<Written> = (0..3).map(|_| rx.recv().unwrap().unwrap()).collect();
    let Written::Accepted(first) = &results[0] else {
        panic!("{results:?}")
    };
    assert_eq!(results[1], Written::Duplicate(first.id));
    assert_eq!(results[2], Written::Conflict(first.id));
    assert_eq!(store.queued_blocking(&agent).unwrap().len(), 1);
}

#[test]
fn completion_moves_task_out_of_queue_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let agent: AgentId = "a".parse().unwrap();
    let id;
    {
        let store = SledStore::open(dir.path()).unwrap();
        let Written::Accepted(t) = blocking(
            &store,
            Write::Submit {
                task: Arc::new(task(&agent)),
                idempotency: None,
            },
        )
        .unwrap() else {
            panic!()
        };
        let mut t = Arc::unwrap_or_clone(t);
        id = t.id;
        t.status = TaskStatus::Success;
        t.finished_at = Some(now_ms());
        let state = AgentState {
            memory: serde_json::json!({"x": 1}),
            ticks: 1,
        };
        blocking(
            &store,
            Write::Complete {
                task: Arc::new(t),
                state,
            },
        )
        .unwrap();
        blocking(
            &store,
            Write::SetToken {
                agent: agent.clone(),
                digest: [7; 32],
            },
        )
        .unwrap();
        store.close().unwrap();
    }
    let store = reopen(dir.path());
    assert!(store.queued_blocking(&agent).unwrap().is_empty());
    assert_eq!(
        store.task_blocking(id).unwrap().unwrap().status,
        TaskStatus::Success
    );
    assert_eq!(store.agent_state_blocking(&agent).unwrap().ticks, 1);
    assert_eq!(store.token_digest(&agent).unwrap(), Some([7; 32]));
    assert_eq!(store.purge(Duration::ZERO).unwrap().tasks, 1);
    assert!(store.task_blocking(id).unwrap().is_none());
}

#[test]
fn purge_removes_old_tasks_and_their_keys_in_chunks_and_keeps_recent_ones() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let agent: AgentId = "a".parse().unwrap();
    let key = |n: usize| IdempotencyKey {
        key: format!("k{n}"),
        body_sha256: [1; 32],
    };
    let finish = |n: usize, finished_at: u64| {
        // Created just before it finished: the purge walks tasks in creation order.
        let mut created = task(&agent);
        created.created_at = finished_at - 1;
        let Written::Accepted(t) = blocking(
            &store,
            Write::Submit {
                task: Arc::new(created),
                idempotency: Some(key(n)),
            },
        )
        .unwrap() else {
            panic!("not accepted")
        };
        let mut t = Arc::unwrap_or_clone(t);
        t.status = TaskStatus::Success;
        t.finished_at = Some(finished_at);
        let id = t.id;
        let state = AgentState::default();
        blocking(
            &store,
            Write::Complete {
                task: Arc::new(t),
                state,
            },
        )
        .unwrap();
        id
    };
    let old = now_ms() - 3_600_000;
    let total = PURGE_CHUNK * 2 + 500;
    let first_old = finish(0, old);
    for n in 1..total {
        finish(n, old);
    }
    let recent = finish(total, now_ms());

    let purged = store.purge(Duration::from_secs(60)).unwrap();
    assert_eq!(purged.tasks, total);
    assert!(store.task_blocking(first_old).unwrap().is_none());
    assert!(store.task_blocking(recent).unwrap().is_some());
    // The purged keys are free again; the recent one still deduplicates.
    let again = |n: usize| {
        blocking(
            &store,
            Write::Submit {
                task: Arc::new(task(&agent)),
                idempotency: Some(key(n)),
            },
        )
        .unwrap()
    };
    assert!(matches!(again(0), Written::Accepted(_)));
    assert_eq!(again(total), Written::Duplicate(recent));
}

#[derive(Default)]
struct Counts {
    fsyncs: std::sync::atomic::AtomicUsize,
    unreadable: Mutex<Vec<String>>,
}

impl Observer for Counts {
    fn fsynced(&self) {
        self.fsyncs.fetch_add(1, Ordering::SeqCst);
    }
    fn unreadable(&self, record: &str) {
        self.unreadable.lock().unwrap().push(record.to_string());
    }
}

fn open_counting(path: &Path, sync: SyncMode) -> (Arc<SledStore>, Arc<Counts>) {
    let counts = Arc::new(Counts::default());
    let store = SledStore::open_opts(
        path,
        Options {
            sync,
            observer: Some(counts.clone()),
            outbox: None,
        },
    )
    .unwrap();
    (store, counts)
}

#[test]
fn fsync_mode_syncs_every_group_commit_and_flush_mode_within_the_period() {
    let agent: AgentId = "a".parse().unwrap();
    let submit = |store: &SledStore| {
        let w = Write::Submit {
            task: Arc::new(task(&agent)),
            idempotency: None,
        };
        assert!(matches!(blocking(store, w), Ok(Written::Accepted(_))));
    };
    let dir = tempfile::tempdir().unwrap();
    let (store, counts) = open_counting(dir.path(), SyncMode::Fsync);
    for _ in 0..3 {
        submit(&store);
    }
    // The sync at open is not a commit and is not counted.
    assert_eq!(counts.fsyncs.load(Ordering::SeqCst), 3);
    store.close().unwrap();

    // Flush mode: commits in a row share one sync per period, and a write followed by
    // silence is still synced once the period has passed.
    let dir = tempfile::tempdir().unwrap();
    let (store, counts) = open_counting(dir.path(), SyncMode::Flush);
    let started = Instant::now();
    for _ in 0..20 {
        submit(&store);
    }
    // Each sync needs a flush and a full period after it, so k syncs take k periods.
    let synced = counts.fsyncs.load(Ordering::SeqCst) as u128;
    let periods = started.elapsed().as_millis() / PERIODIC_SYNC.as_millis();
    assert!(synced <= periods + 1, "{synced} syncs in {periods} periods");
    let deadline = Instant::now() + Duration::from_secs(10);
    while counts.fsyncs.load(Ordering::SeqCst) as u128 == synced {
        assert!(Instant::now() < deadline, "the last write was never synced");
        std::thread::sleep(Duration::from_millis(20));
    }
    store.close().unwrap();
}

#[test]
fn inputs_deeper_than_serde_json_default_limit_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let agent: AgentId = "a".parse().unwrap();
    let mut inputs = serde_json::json!(1);
    for _ in 0..127 {
        inputs = serde_json::json!([inputs]);
    }
    let t = Task::new(agent.clone(), inputs.clone(), Source::default());
    let Written::Accepted(t) = blocking(
        &store,
        Write::Submit {
            task: Arc::new(t),
            idempotency: None,
        },
    )
    .unwrap() else {
        panic!()
    };
    assert_eq!(store.task_blocking(t.id).unwrap().unwrap().inputs, inputs);
}

#[test]
fn undecodable_records_are_reported_once_and_purge_still_removes_them() {
    let dir = tempfile::tempdir().unwrap();
    let (store, counts) = open_counting(dir.path(), SyncMode::Flush);
    let agent: AgentId = "a".parse().unwrap();
    let id = TaskId::from_bytes([9; 16]);
    let db = store.shared.db().unwrap();
    db.insert(task_key(&id), b"{not json".to_vec()).unwrap();
    db.insert(finished_key(1, &id), id.as_bytes().to_vec())
        .unwrap();
    db.insert(key(AGENT, &[agent.to_string().as_bytes()]), b"[".to_vec())
        .unwrap();
    drop(db);
    for _ in 0..2 {
        assert!(
            matches!(store.task_blocking(id), Err(StoreError::Backend(m)) if m.contains(&id.to_string()))
        );
    }
    assert!(store.agent_state_blocking(&agent).is_err());
    let reported = counts.unreadable.lock().unwrap().clone();
    assert_eq!(reported.len(), 2, "{reported:?}");
    assert!(reported.contains(&format!("task {id}")));
    assert_eq!(store.unreadable_records().len(), 2);
    assert_eq!(store.purge(Duration::ZERO).unwrap().tasks, 1);
    assert!(store.task_blocking(id).unwrap().is_none());
    assert!(store.healthy());
}

#[test]
fn schedule_cursors_are_keyed_by_entry_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let agent: AgentId = "a".parse().unwrap();
    let k = |index: usize, fingerprint: &str| ScheduleKey {
        agent: agent.clone(),
        index,
        fingerprint: fingerprint.into(),
    };
    let cursor = ScheduleCursor {
        first_seen: 10,
        considered: 20,
    };
    {
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(
            store.schedule_cursor_blocking(&k(0, "every 5s")).unwrap(),
            None
        );
        blocking(
            &store,
            Write::SetScheduleCursor {
                key: k(0, "every 5s"),
                cursor,
            },
        )
        .unwrap();
        store.close().unwrap();
    }
    let store = reopen(dir.path());
    assert_eq!(
        store.schedule_cursor_blocking(&k(0, "every 5s")).unwrap(),
        Some(cursor)
    );
    assert_eq!(
        store.schedule_cursor_blocking(&k(0, "every 6s")).unwrap(),
        None
    );
    assert_eq!(
        store.schedule_cursor_blocking(&k(1, "every 5s")).unwrap(),
        None
    );
}

fn submit_at(store: &SledStore, agent: &AgentId, created_at: u64) -> Task {
    let mut t = task(agent);
    t.created_at = created_at;
    let Written::Accepted(t) = blocking(
        store,
        Write::Submit {
            task: Arc::new(t),
            idempotency: None,
        },
    )
    .unwrap() else {
        panic!("not accepted")
    };
    Arc::unwrap_or_clone(t)
}

fn page(store: &SledStore, q: ListQuery) -> TaskPage {
    store.list_tasks_blocking(&q).unwrap()
}

#[test]
fn cancel_is_ordered_with_start_by_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let agent: AgentId = "a".parse().unwrap();
    let cancel = |id| Write::Cancel { id, at_ms: 7 };

    // Revoked first: the start (and a completion) are refused, the record stays REVOKED.
    let t = submit_at(&store, &agent, 1);
    let Written::Cancel(CancelOutcome::Revoked(r)) = blocking(&store, cancel(t.id)).unwrap() else {
        panic!()
    };
    assert_eq!((r.status, r.finished_at), (TaskStatus::Revoked, Some(7)));
    assert!(store.queued_blocking(&agent).unwrap().is_empty());
    let mut started = t.clone();
    started.status = TaskStatus::Started;
    assert_eq!(
        blocking(&store, Write::Start(Arc::new(started.clone()))).unwrap(),
        Written::Revoked
    );
    started.status = TaskStatus::Success;
    let complete = Write::Complete {
        task: Arc::new(started),
        state: AgentState::default(),
    };
    assert_eq!(blocking(&store, complete).unwrap(), Written::Revoked);
    assert_eq!(
        store.task_blocking(t.id).unwrap().unwrap().status,
        TaskStatus::Revoked
    );
    assert_eq!(
        blocking(&store, cancel(t.id)).unwrap(),
        Written::Cancel(CancelOutcome::NotCancellable(TaskStatus::Revoked))
    );

    // Started first, even within one batch: the cancel is refused.
    let t = submit_at(&store, &agent, 2);
    let mut started = t.clone();
    started.status = TaskStatus::Started;
    let (tx, rx) = std::sync::mpsc::channel();
    for w in [Write::Start(Arc::new(started)), cancel(t.id)] {
        let tx = tx.clone();
        store.write(w, Box::new(move |r| tx.send(r).unwrap()));
    }
    assert_eq!(rx.recv().unwrap().unwrap(), Written::Done);
    assert_eq!(
        rx.recv().unwrap().unwrap(),
        Written::Cancel(CancelOutcome::NotCancellable(TaskStatus::Started))
    );
    assert_eq!(
        blocking(&store, cancel(TaskId::random())).unwrap(),
        Written::Cancel(CancelOutcome::Unknown)
    );
}

#[test]
fn an_unfiltered_walk_merges_every_agents_index_newest_first_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let agents: Vec<AgentId> = ["a", "b/x", "b/xy", "c"]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    // Interleaved times, ties across agents included (ordered by id then).
    let mut all = Vec::new();
    for i in 0..40u64 {
        let t = submit_at(&store, &agents[(i * 7 % 4) as usize], 100 + i / 2);
        all.push((t.created_at, t.id));
    }
    all.sort();
    all.reverse();
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let p = page(
            &store,
            ListQuery {
                agent: None,
                status: None,
                since_ms: Some(101),
                until_ms: None,
                cursor,
                limit: 3,
                scan_limit: 1000,
            },
        );
        seen.extend(p.tasks.iter().map(|t| (t.created_at, t.id)));
        match p.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    let expected: Vec<_> = all.into_iter().filter(|(ms, _)| *ms >= 101).collect();
    assert_eq!(seen, expected);
}

#[test]
fn listing_walks_newest_first_with_filters_and_bounded_scans() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let (a, b): (AgentId, AgentId) = ("a".parse().unwrap(), "b".parse().unwrap());
    let mut all = Vec::new();
    for ms in 1..=30u64 {
        let agent = if ms % 3 == 0 { &b } else { &a };
        all.push(submit_at(&store, agent, ms / 2));
    }
    let q = |limit| ListQuery {
        limit,
        scan_limit: 1000,
        ..ListQuery::default()
    };
    // A walk in pages of 7 sees everything once, newest first, with tasks arriving.
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let p = page(&store, ListQuery { cursor, ..q(7) });
        seen.extend(p.tasks.iter().map(|t| (t.created_at, t.id)));
        submit_at(&store, &a, now_ms());
        match p.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    let mut expected: Vec<_> = all.iter().map(|t| (t.created_at, t.id)).collect();
    expected.sort();
    expected.reverse();
    assert_eq!(seen, expected);

    let only_b = page(
        &store,
        ListQuery {
            agent: Some(b.clone()),
            since_ms: Some(3),
            until_ms: Some(9),
            ..q(100)
        },
    );
    assert!(only_b
        .tasks
        .iter()
        .all(|t| t.agent == b && (3..9).contains(&t.created_at)));
    assert_eq!(only_b.tasks.len(), 4);

    // A status filter with no match stops at the scan bound and hands back a cursor.
    let none = page(
        &store,
        ListQuery {
            status: Some(TaskStatus::Failure),
            scan_limit: 10,
            ..q(100)
        },
    );
    assert!(none.tasks.is_empty());
    assert!(none.next_cursor.is_some());
}

#[test]
fn purge_removes_listing_entries_and_never_a_task_that_is_not_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let agent: AgentId = "a".parse().unwrap();
    let done = submit_at(&store, &agent, 1);
    let mut finished = done.clone();
    finished.status = TaskStatus::Success;
    finished.finished_at = Some(1);
    blocking(
        &store,
        Write::Complete {
            task: Arc::new(finished),
            state: AgentState::default(),
        },
    )
    .unwrap();
    let revoked = submit_at(&store, &agent, 2);
    blocking(
        &store,
        Write::Cancel {
            id: revoked.id,
            at_ms: 1,
        },
    )
    .unwrap();
    // A task finished once that is running again (parked) is not purged.
    let again = submit_at(&store, &agent, 3);
    let mut parked = again.clone();
    parked.status = TaskStatus::AwaitingInput;
    parked.finished_at = Some(1);
    blocking(
        &store,
        Write::Complete {
            task: Arc::new(parked),
            state: AgentState::default(),
        },
    )
    .unwrap();
    assert_eq!(store.purge(Duration::ZERO).unwrap().tasks, 2);
    assert!(store.task_blocking(done.id).unwrap().is_none());
    assert!(store.task_blocking(revoked.id).unwrap().is_none());
    assert!(store.task_blocking(again.id).unwrap().is_some());
    let db = store.shared.db().unwrap();
    assert_eq!(db.scan_prefix(LIST_AGENT).count(), 1);
    assert!(db.scan_prefix(REVOKED).next().is_none());
    let listed = page(
        &store,
        ListQuery {
            limit: 10,
            scan_limit: 10,
            ..ListQuery::default()
        },
    );
    assert_eq!(listed.tasks.len(), 1);
}

#[test]
fn the_purge_walks_past_tasks_that_are_not_due_and_still_reads_finished_entries() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let agent: AgentId = "a".parse().unwrap();
    // More unfinished tasks before the cutoff than one purge write looks at, then one that
    // is due: a single purge still reaches it.
    let wall = PURGE_CHUNK * PURGE_LOOK_FACTOR + 5;
    let mut running = Vec::new();
    for n in 0..wall {
        let mut t = submit_at(&store, &agent, 10 + n as u64);
        t.status = TaskStatus::Started;
        t.started_at = Some(11 + n as u64);
        blocking(&store, Write::Start(Arc::new(t.clone()))).unwrap();
        running.push(t.id);
    }
    let due = submit_at(&store, &agent, 10 + wall as u64);
    let mut done = due.clone();
    done.status = TaskStatus::Failure;
    done.finished_at = Some(20 + wall as u64);
    complete(&store, &done);
    // A task of the release before this one: a finished entry beside its state record.
    let both = submit_at(&store, &agent, 5);
    let mut finished = both.clone();
    finished.status = TaskStatus::Success;
    finished.finished_at = Some(6);
    complete(&store, &finished);
    let db = store.shared.db().unwrap();
    db.insert(finished_key(6, &both.id), both.id.as_bytes().to_vec())
        .unwrap();
    // A finished task writes no finished entry any more.
    assert_eq!(db.scan_prefix(FINISHED).count(), 1);
    drop(db);

    assert_eq!(store.purge(Duration::ZERO).unwrap().tasks, 2, "each once");
    assert!(store.task_blocking(due.id).unwrap().is_none());
    assert!(store.task_blocking(both.id).unwrap().is_none());
    assert!(running
        .iter()
        .all(|id| store.task_blocking(*id).unwrap().is_some()));
    let db = store.shared.db().unwrap();
    assert!(db.scan_prefix(FINISHED).next().is_none());
    assert_eq!(db.scan_prefix(TASK).count(), wall, "only the running tasks");
    assert!(db.scan_prefix(STATE).next().is_none(), "no state records");
    // Nothing left to do: the next purge finds nothing and ends.
    assert_eq!(store.purge(Duration::ZERO).unwrap().tasks, 0);
}

#[test]
fn a_purge_leaves_a_task_changed_earlier_in_its_batch() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let agent: AgentId = "a".parse().unwrap();
    let t = submit_at(&store, &agent, 1);
    let mut done = t.clone();
    done.status = TaskStatus::Failure;
    done.finished_at = Some(2);
    complete(&store, &done);
    // Staged by hand, as the writer would if the two writes met in one group commit.
    let db = store.shared.db().unwrap();
    let (mut batch, mut staged, revoked) = (
        sled::Batch::default(),
        Staged::default(),
        foldhash::HashSet::default(),
    );
    let mut again = done.clone();
    again.status = TaskStatus::Started;
    again.finished_at = None;
    let shared = &store.shared;
    let start = Write::Start(Arc::new(again));
    stage(&db, shared, &revoked, &mut batch, &mut staged, start).unwrap();
    *shared.purge_cursor.lock().unwrap() = Some(LIST_AGENT.to_vec());
    let purge = Write::Purge {
        finished_before_ms: now_ms(),
        limit: 10,
    };
    let purged = stage(&db, shared, &revoked, &mut batch, &mut staged, purge).unwrap();
    assert_eq!(purged, Written::Purged(0));
    db.apply_batch(batch).unwrap();
    let stored = store.task_blocking(t.id).unwrap().expect("not purged");
    assert_eq!(stored.status, TaskStatus::Started);
    // Once that batch is on disk, the task is judged by what it is now.
    assert_eq!(store.purge(Duration::ZERO).unwrap().tasks, 0);
}

#[test]
fn status_changes_stage_deliveries_in_the_same_batch_and_they_survive_reopen() {
    use crate::outbox::{DeliveryStatus, EndpointPlan, EventType};
    let dir = tempfile::tempdir().unwrap();
    let agent: AgentId = "a".parse().unwrap();
    let quiet: AgentId = "b".parse().unwrap();
    let outbox = || {
        Arc::new(Outbox::new(HashMap::from([(
            agent.clone(),
            vec![EndpointPlan {
                events: EventType::ALL.into_iter().collect(),
            }],
        )])))
    };
    let open = |outbox: Arc<Outbox>| {
        reopen_opts(dir.path(), || Options {
            outbox: Some(outbox.clone()),
            ..Options::default()
        })
    };
    let first = outbox();
    let mut rx = first.take_receiver().unwrap();
    let store = open(first);
    let Written::Accepted(t) = blocking(
        &store,
        Write::Submit {
            task: Arc::new(task(&agent)),
            idempotency: None,
        },
    )
    .unwrap() else {
        panic!()
    };
    let mut started = (*t).clone();
    started.status = TaskStatus::Started;
    started.tick = 1;
    let started = Arc::new(started);
    // Start written twice: the second is no status change and plans nothing.
    blocking(&store, Write::Start(started.clone())).unwrap();
    blocking(&store, Write::Start(started.clone())).unwrap();
    let mut done = (*started).clone();
    done.status = TaskStatus::Success;
    blocking(
        &store,
        Write::Complete {
            task: Arc::new(done),
            state: AgentState::default(),
        },
    )
    .unwrap();
    blocking(
        &store,
        Write::Submit {
            task: Arc::new(task(&quiet)),
            idempotency: None,
        },
    )
    .unwrap();
    let mut handed = Vec::new();
    while let Ok(d) = rx.try_recv() {
        handed.push(d);
    }
    assert_eq!(
        handed.iter().map(|d| d.event).collect::<Vec<_>>(),
        vec![EventType::Started, EventType::Succeeded]
    );
    assert!(handed[0].id < handed[1].id);
    assert_eq!(handed[1].webhook_id, format!("{}.task.succeeded.1", t.id));
    store.close().unwrap();
    drop(store);
    let store = open(outbox());
    let all = read_deliveries(
        &store.shared,
        &DeliveryQuery {
            limit: 10,
            ..DeliveryQuery::default()
        },
    )
    .unwrap();
    assert_eq!(all, handed);
    let after = read_deliveries(
        &store.shared,
        &DeliveryQuery {
            after: Some(handed[0].id),
            status: Some(DeliveryStatus::Pending),
            limit: 10,
            ..DeliveryQuery::default()
        },
    )
    .unwrap();
    assert_eq!(after.len(), 1);
    blocking(
        &store,
        Write::NotifyEndpoint {
            agent: agent.clone(),
            endpoint: 3,
            disabled: true,
        },
    )
    .unwrap();
    assert_eq!(
        read_disabled_endpoints(&store.shared).unwrap(),
        vec![(agent.clone(), 3)]
    );
    blocking(
        &store,
        Write::NotifyEndpoint {
            agent: agent.clone(),
            endpoint: 3,
            disabled: false,
        },
    )
    .unwrap();
    assert!(read_disabled_endpoints(&store.shared).unwrap().is_empty());
    // Retention removes finished deliveries and keeps pending ones.
    let mut finished = all[0].clone();
    finished.status = DeliveryStatus::Succeeded;
    blocking(&store, Write::Delivery(Box::new(finished))).unwrap();
    store.purge(Duration::ZERO).unwrap();
    let left = read_deliveries(
        &store.shared,
        &DeliveryQuery {
            limit: 10,
            ..DeliveryQuery::default()
        },
    )
    .unwrap();
    assert_eq!(left, vec![all[1].clone()]);
}

/// Records `task` (already finished) as its tick's outcome.
fn complete(store: &SledStore, task: &Task) {
    let write = Write::Complete {
        task: Arc::new(task.clone()),
        state: AgentState::default(),
    };
    assert_eq!(blocking(store, write).unwrap(), Written::Done);
}

#[test]
fn state_records_of_earlier_layouts_are_read_superseded_and_purged() {
    let dir = tempfile::tempdir().unwrap();
    let agent: AgentId = "a".parse().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let db = store.shared.db().unwrap();
    // What the first binary layout left for two started tasks: the head as accepted, and the
    // state beside it under either key it used (`u/<task id>`, then `u/<created_at><task id>`).
    let (old, newer) = (submit_at(&store, &agent, 1), submit_at(&store, &agent, 2));
    let started = |t: &Task| {
        let mut s = t.clone();
        s.status = TaskStatus::Started;
        s.attempt = 1;
        s
    };
    for (t, state_key) in [
        (&old, legacy_state_key(&old.id)),
        (&newer, state_key(&newer)),
    ] {
        db.insert(task_key(&t.id), record::encode_task_v1(t))
            .unwrap();
        db.insert(state_key, record::encode_state(&started(t)))
            .unwrap();
        assert_eq!(store.task_blocking(t.id).unwrap().unwrap(), started(t));
    }
    // The next change writes a whole head, which the stale state records do not override.
    for t in [&old, &newer] {
        let mut finished = started(t);
        finished.status = TaskStatus::Success;
        finished.finished_at = Some(5);
        complete(&store, &finished);
        let head = db.get(task_key(&t.id)).unwrap().unwrap();
        assert_eq!(head[0], record::TASK_V2);
        assert_eq!(store.task_blocking(t.id).unwrap().unwrap(), finished);
    }
    assert_eq!(
        db.scan_prefix(STATE).count(),
        2,
        "stale, left until the purge"
    );
    // A purge takes them with their tasks.
    assert_eq!(store.purge(Duration::ZERO).unwrap().tasks, 2);
    assert!(db.scan_prefix(STATE).next().is_none());
    assert!(db.scan_prefix(TASK).next().is_none());
    assert!(store.task_blocking(old.id).unwrap().is_none());
    store.close().unwrap();
}

#[test]
fn a_first_layout_task_not_changed_since_is_purged_by_its_state_record() {
    let dir = tempfile::tempdir().unwrap();
    let agent: AgentId = "a".parse().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let db = store.shared.db().unwrap();
    let (done, running) = (submit_at(&store, &agent, 1), submit_at(&store, &agent, 2));
    let mut finished = done.clone();
    finished.status = TaskStatus::Success;
    finished.finished_at = Some(3);
    let mut started = running.clone();
    started.status = TaskStatus::Started;
    for (t, state) in [(&done, &finished), (&running, &started)] {
        db.insert(task_key(&t.id), record::encode_task_v1(t))
            .unwrap();
        db.insert(state_key(t), record::encode_state(state))
            .unwrap();
    }
    // Only the finished one is due: its head says PENDING, its state record SUCCESS.
    assert_eq!(store.purge(Duration::ZERO).unwrap().tasks, 1);
    assert!(store.task_blocking(done.id).unwrap().is_none());
    assert_eq!(store.task_blocking(running.id).unwrap().unwrap(), started);
    assert_eq!(db.scan_prefix(STATE).count(), 1);
    store.close().unwrap();
}

#[test]
fn the_purge_drops_listing_entries_whose_task_is_gone_and_counts_them_not() {
    let dir = tempfile::tempdir().unwrap();
    let agent: AgentId = "a".parse().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let db = store.shared.db().unwrap();
    let t = submit_at(&store, &agent, 1);
    // What the purge of an unreadable record leaves: the listing entry without its head (and,
    // for a task of the first binary layout, state records).
    db.remove(task_key(&t.id)).unwrap();
    let state = record::encode_state(&t);
    db.insert(state_key(&t), state.clone()).unwrap();
    db.insert(legacy_state_key(&t.id), state).unwrap();
    assert_eq!(db.scan_prefix(LIST_AGENT).count(), 1);
    assert_eq!(store.purge(Duration::ZERO).unwrap().tasks, 0);
    assert!(db.scan_prefix(LIST_AGENT).next().is_none());
    assert!(db.scan_prefix(STATE).next().is_none());
    store.close().unwrap();
}

#[test]
fn a_damaged_listing_key_does_not_end_its_agents_purge_walk() {
    let dir = tempfile::tempdir().unwrap();
    let agent: AgentId = "a".parse().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let db = store.shared.db().unwrap();
    let finished = |created| {
        let mut t = submit_at(&store, &agent, created);
        t.status = TaskStatus::Success;
        t.finished_at = Some(300);
        complete(&store, &t);
        t
    };
    let (early, late) = (finished(1), finished(256));
    // Seven bytes after the agent's prefix: between the two keys, too short for an entry.
    let mut damaged = list_agent_prefix(&agent);
    damaged.extend_from_slice(&[0, 0, 0, 0, 0, 0, 1]);
    db.insert(damaged, vec![]).unwrap();
    let keys: Vec<_> = db
        .scan_prefix(LIST_AGENT)
        .keys()
        .map(Result::unwrap)
        .collect();
    assert_eq!(keys.len(), 3);
    assert!(
        keys[0].len() > keys[1].len() && keys[1].len() < keys[2].len(),
        "in between"
    );
    assert_eq!(store.purge(Duration::ZERO).unwrap().tasks, 2);
    assert!(store.task_blocking(early.id).unwrap().is_none());
    assert!(store.task_blocking(late.id).unwrap().is_none());
    store.close().unwrap();
}

#[test]
fn a_task_of_a_release_before_the_listing_is_listed_at_its_next_change_and_purged() {
    let dir = tempfile::tempdir().unwrap();
    let agent: AgentId = "a".parse().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let db = store.shared.db().unwrap();
    // What releases before the segmented queue left: queue positions without its top bit and
    // JSON heads; the oldest of them (before the listing index) no listing entry either.
    let (unlisted, listed) = (submit_at(&store, &agent, 1), submit_at(&store, &agent, 2));
    let unlisted_key = listing_key(
        &list_agent_prefix(&agent),
        &listing::entry(unlisted.created_at, &unlisted.id),
    );
    db.remove(unlisted_key).unwrap();
    for k in db.scan_prefix(QUEUE).keys() {
        db.remove(k.unwrap()).unwrap();
    }
    let old = |t: &Task, seq| {
        let mut t = t.clone();
        t.seq = seq;
        db.insert(task_key(&t.id), serde_json::to_vec(&t).unwrap())
            .unwrap();
        t
    };
    let (unlisted, listed) = (old(&unlisted, 7), old(&listed, 8));
    let all = ListQuery {
        limit: 10,
        scan_limit: 10,
        ..ListQuery::default()
    };
    let ids = |store: &SledStore| -> Vec<TaskId> {
        page(store, all.clone())
            .tasks
            .iter()
            .map(|t| t.id)
            .collect()
    };
    assert_eq!(ids(&store), vec![listed.id]);
    for t in [&unlisted, &listed] {
        let mut done = t.clone();
        done.status = TaskStatus::Success;
        done.finished_at = Some(3);
        complete(&store, &done);
    }
    // Listed by its change, the other one still once.
    assert_eq!(ids(&store), vec![listed.id, unlisted.id]);
    assert_eq!(store.purge(Duration::ZERO).unwrap().tasks, 2);
    assert!(store.task_blocking(unlisted.id).unwrap().is_none());
    assert!(db.scan_prefix(LIST_AGENT).next().is_none());
    store.close().unwrap();
}

#[test]
fn a_parked_task_of_a_release_before_the_listing_is_listed_when_answered() {
    let dir = tempfile::tempdir().unwrap();
    let agent: AgentId = "a".parse().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let db = store.shared.db().unwrap();
    let mut t = submit_at(&store, &agent, 1);
    for k in db
        .scan_prefix(LIST_AGENT)
        .keys()
        .chain(db.scan_prefix(QUEUE).keys())
    {
        db.remove(k.unwrap()).unwrap();
    }
    t.seq = 7;
    t.status = TaskStatus::AwaitingInput;
    t.awaiting = Some(crate::model::Awaiting {
        request: serde_json::json!({"q": 1}),
        since: 1,
        expires_at: u64::MAX,
    });
    db.insert(task_key(&t.id), serde_json::to_vec(&t).unwrap())
        .unwrap();
    let answer = Write::Resume {
        id: t.id,
        response: serde_json::json!({"a": 1}),
    };
    assert!(matches!(
        blocking(&store, answer).unwrap(),
        Written::Updated(_)
    ));
    // Answered, it took a new queue position; it was listed under its old one first.
    let listed = page(
        &store,
        ListQuery {
            limit: 10,
            scan_limit: 10,
            ..ListQuery::default()
        },
    );
    assert_eq!(listed.tasks.len(), 1);
    assert_eq!(listed.tasks[0].id, t.id);
    store.close().unwrap();
}

#[test]
fn an_unreadable_whole_head_is_left_by_the_purge() {
    let dir = tempfile::tempdir().unwrap();
    let agent: AgentId = "a".parse().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let db = store.shared.db().unwrap();
    let t = submit_at(&store, &agent, 1);
    db.insert(task_key(&t.id), vec![record::TASK_V2, 0xff])
        .unwrap();
    assert_eq!(store.purge(Duration::ZERO).unwrap().tasks, 0);
    assert!(db.get(task_key(&t.id)).unwrap().is_some(), "may still run");
    assert_eq!(store.purge(Duration::ZERO).unwrap().tasks, 0);
    store.close().unwrap();
}

#[test]
fn changes_rewrite_the_whole_head_and_revocations_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let agent: AgentId = "a".parse().unwrap();
    let (done, revoked);
    {
        let store = SledStore::open(dir.path()).unwrap();
        let t = submit_at(&store, &agent, 1);
        let db = store.shared.db().unwrap();
        let head = db.get(task_key(&t.id)).unwrap().unwrap();
        assert_eq!(head[0], record::TASK_V2);
        let mut finished = t.clone();
        finished.status = TaskStatus::Success;
        finished.finished_at = Some(5);
        finished.result = Some(serde_json::json!({"response": {"once": true}}).into());
        complete(&store, &finished);
        // One record per task: the head, rewritten, holding the output once.
        let head = db.get(task_key(&t.id)).unwrap().unwrap();
        assert_eq!(head[0], record::TASK_V2);
        let once = br#"{"once":true}"#;
        let seen = head.windows(once.len()).filter(|w| w == once).count();
        assert_eq!(seen, 1);
        assert!(db.scan_prefix(STATE).next().is_none());
        assert_eq!(store.task_blocking(t.id).unwrap().unwrap(), finished);
        done = finished;
        let r = submit_at(&store, &agent, 2);
        blocking(&store, Write::Cancel { id: r.id, at_ms: 3 }).unwrap();
        revoked = r;
        store.close().unwrap();
    }
    let store = reopen(dir.path());
    assert_eq!(store.task_blocking(done.id).unwrap().unwrap(), done);
    let mut started = revoked.clone();
    started.status = TaskStatus::Started;
    assert_eq!(
        blocking(&store, Write::Start(Arc::new(started))).unwrap(),
        Written::Revoked,
        "the revocation is known to the writer after a reopen"
    );
    // Purged, the task leaves the writer's set with its records.
    assert_eq!(store.purge(Duration::ZERO).unwrap().tasks, 2);
    let db = store.shared.db().unwrap();
    assert!(db.scan_prefix(STATE).next().is_none());
    assert!(db.scan_prefix(TASK).next().is_none());
}

#[test]
fn second_open_reports_lock() {
    let dir = tempfile::tempdir().unwrap();
    let _store = SledStore::open(dir.path()).unwrap();
    assert!(matches!(
        SledStore::open(dir.path()),
        Err(StoreError::Locked { .. })
    ));
}

#[test]
fn write_async_resolves() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let agent: AgentId = "a".parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let res = rt.block_on(write_async(
        store.as_ref(),
        Write::Submit {
            task: Arc::new(task(&agent)),
            idempotency: None,
        },
    ));
    assert!(matches!(res, Ok(Written::Accepted(_))));
}

/// Stages `writes` in one batch and applies it, as one group commit of the writer does. It
/// bypasses the writer, whose cache of each agent's newest listing entry then lags: a test
/// that lists tasks this way must not also submit tasks of the same agent through the writer.
fn one_commit(store: &SledStore, writes: Vec<Write>) -> Vec<Written> {
    let db = store.shared.db().unwrap();
    let (mut batch, mut staged) = (sled::Batch::default(), Staged::default());
    let revoked = foldhash::HashSet::default();
    let written = writes
        .into_iter()
        .map(|w| stage(&db, &store.shared, &revoked, &mut batch, &mut staged, w).unwrap())
        .collect();
    staged.write_queue(&mut batch);
    staged.write_listing(&mut batch);
    db.apply_batch(batch).unwrap();
    written
}

fn accepted(written: Vec<Written>) -> Vec<Task> {
    written
        .into_iter()
        .map(|w| match w {
            Written::Accepted(t) => Arc::unwrap_or_clone(t),
            other => panic!("unexpected {other:?}"),
        })
        .collect()
}

fn submits(agent: &AgentId, n: usize) -> Vec<Write> {
    (0..n)
        .map(|_| Write::Submit {
            task: Arc::new(task(agent)),
            idempotency: None,
        })
        .collect()
}

fn queue_keys(store: &SledStore, agent: &AgentId) -> usize {
    let db = store.shared.db().unwrap();
    db.scan_prefix(queue_prefix(agent)).count()
}

fn ids(tasks: &[&Task]) -> Vec<TaskId> {
    tasks.iter().map(|t| t.id).collect()
}

#[test]
fn one_group_commit_queues_an_agents_tasks_under_one_key_and_completions_shrink_it() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b): (AgentId, AgentId) = ("a".parse().unwrap(), "b".parse().unwrap());
    let store = SledStore::open(dir.path()).unwrap();
    let mut writes = submits(&a, 3);
    writes.extend(submits(&b, 2));
    writes.extend(submits(&a, 1));
    let t = accepted(one_commit(&store, writes));
    assert_eq!((queue_keys(&store, &a), queue_keys(&store, &b)), (1, 1));
    assert_eq!(
        store.queued_blocking(&a).unwrap(),
        ids(&[&t[0], &t[1], &t[2], &t[5]])
    );
    assert_eq!(store.queued_blocking(&b).unwrap(), ids(&[&t[3], &t[4]]));
    // A later commit takes two out of the segment and queues one more behind it.
    let done = |t: &Task| Write::Complete {
        task: Arc::new(t.clone()),
        state: AgentState::default(),
    };
    let mut writes = vec![done(&t[0]), done(&t[2])];
    writes.extend(submits(&a, 1));
    let more = one_commit(&store, writes).pop().unwrap();
    let Written::Accepted(t6) = more else {
        panic!("not accepted")
    };
    assert!(t6.seq > t[5].seq);
    assert_eq!(queue_keys(&store, &a), 2);
    assert_eq!(
        store.queued_blocking(&a).unwrap(),
        ids(&[&t[1], &t[5], &t6])
    );
    // The writer's own commits, and a reopen, see the same queue.
    complete(&store, &t[1]);
    complete(&store, &t[5]);
    drop(store);
    let store = reopen(dir.path());
    assert_eq!(store.queued_blocking(&a).unwrap(), vec![t6.id]);
    assert_eq!(queue_keys(&store, &a), 1, "the emptied segment is removed");
    complete(&store, &t6);
    assert_eq!(queue_keys(&store, &a), 0);
    assert_eq!(store.queued_blocking(&b).unwrap(), ids(&[&t[3], &t[4]]));
}

#[test]
fn queue_entries_of_the_previous_layout_come_first_and_leave_with_their_task() {
    let dir = tempfile::tempdir().unwrap();
    let agent: AgentId = "a".parse().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let db = store.shared.db().unwrap();
    // What the previous release wrote for a queued task: its head with a sled id as its
    // position, and a key of its own holding the bare task id.
    let mut old = task(&agent);
    old.seq = 7;
    let (mut batch, mut staged) = (sled::Batch::default(), Staged::default());
    put_task(
        &db,
        &store.shared,
        &mut batch,
        &mut staged,
        &old,
        Part::Head,
    )
    .unwrap();
    batch.insert(queue_key(&agent, 7), old.id.as_bytes().to_vec());
    db.apply_batch(batch).unwrap();
    let new = accepted(one_commit(&store, submits(&agent, 1))).remove(0);
    assert!(new.seq > old.seq);
    assert_eq!(store.queued_blocking(&agent).unwrap(), ids(&[&old, &new]));
    complete(&store, &old);
    assert_eq!(store.queued_blocking(&agent).unwrap(), vec![new.id]);
    assert_eq!(db.get(queue_key(&agent, 7)).unwrap(), None);
    assert!(store.unreadable_records().is_empty());
}

#[test]
fn a_damaged_segment_is_reported_and_left_not_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let agent: AgentId = "a".parse().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let db = store.shared.db().unwrap();
    let t = accepted(one_commit(&store, submits(&agent, 2)));
    let (base, _) = queue::locate(t[0].seq).unwrap();
    db.insert(queue_key(&agent, base), vec![1, 2, 3]).unwrap();
    assert_eq!(store.queued_blocking(&agent).unwrap(), Vec::<TaskId>::new());
    complete(&store, &t[0]);
    assert_eq!(
        db.get(queue_key(&agent, base)).unwrap().as_deref(),
        Some(&[1u8, 2, 3][..])
    );
    assert_eq!(store.unreadable_records().len(), 1);
}

fn list_keys(store: &SledStore, agent: &AgentId) -> usize {
    let db = store.shared.db().unwrap();
    db.scan_prefix(list_agent_prefix(agent)).count()
}

fn submits_at(agent: &AgentId, created: &[u64]) -> Vec<Write> {
    created
        .iter()
        .map(|&ms| {
            let mut t = task(agent);
            t.created_at = ms;
            Write::Submit {
                task: Arc::new(t),
                idempotency: None,
            }
        })
        .collect()
}

/// Every listed task of a walk in pages of `limit` between the bounds, as (created, id).
fn walk(
    store: &SledStore,
    agent: Option<&AgentId>,
    since: Option<u64>,
    until: Option<u64>,
    limit: usize,
) -> Vec<(u64, TaskId)> {
    let (mut seen, mut cursor) = (Vec::new(), None);
    loop {
        let p = page(
            store,
            ListQuery {
                agent: agent.cloned(),
                since_ms: since,
                until_ms: until,
                cursor,
                limit,
                scan_limit: 1000,
                ..ListQuery::default()
            },
        );
        seen.extend(p.tasks.iter().map(|t| (t.created_at, t.id)));
        match p.next_cursor {
            Some(c) => cursor = Some(c),
            None => return seen,
        }
    }
}

fn newest_first(tasks: &[Task]) -> Vec<(u64, TaskId)> {
    let mut all: Vec<_> = tasks.iter().map(|t| (t.created_at, t.id)).collect();
    all.sort_by(|a, b| b.cmp(a));
    all
}

#[test]
fn one_group_commit_lists_an_agents_tasks_under_one_key_and_stragglers_keep_the_order() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b): (AgentId, AgentId) = ("a".parse().unwrap(), "b".parse().unwrap());
    let store = SledStore::open(dir.path()).unwrap();
    let mut writes = submits_at(&a, &[10, 30, 20, 30]);
    writes.extend(submits_at(&b, &[25]));
    let mut tasks = accepted(one_commit(&store, writes));
    assert_eq!((list_keys(&store, &a), list_keys(&store, &b)), (1, 1));
    // 25 falls inside the first key's range and joins it; 40 is newer than everything and
    // opens a key; 5 is older than everything and takes a key of its own.
    tasks.extend(accepted(one_commit(&store, submits_at(&a, &[25, 40, 5]))));
    assert_eq!(list_keys(&store, &a), 3);
    let of_a: Vec<Task> = tasks.iter().filter(|t| t.agent == a).cloned().collect();
    for limit in [1, 2, 3, 10] {
        assert_eq!(
            walk(&store, Some(&a), None, None, limit),
            newest_first(&of_a)
        );
        assert_eq!(walk(&store, None, None, None, limit), newest_first(&tasks));
    }
    // Bounds that cut through a key's range.
    let inside: Vec<Task> = of_a
        .iter()
        .filter(|t| (20..31).contains(&t.created_at))
        .cloned()
        .collect();
    assert_eq!(
        walk(&store, Some(&a), Some(20), Some(31), 2),
        newest_first(&inside)
    );
    assert!(store.unreadable_records().is_empty());
}

#[test]
fn a_purge_takes_entries_out_of_their_key_and_a_key_moves_to_its_oldest_left() {
    let dir = tempfile::tempdir().unwrap();
    let agent: AgentId = "a".parse().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let t = accepted(one_commit(&store, submits_at(&agent, &[1, 2, 3])));
    for done in [&t[0], &t[2]] {
        let mut done = done.clone();
        done.status = TaskStatus::Success;
        done.finished_at = Some(4);
        complete(&store, &done);
    }
    assert_eq!(store.purge(Duration::ZERO).unwrap().tasks, 2);
    assert_eq!(walk(&store, None, None, None, 10), newest_first(&t[1..2]));
    let db = store.shared.db().unwrap();
    let keys: Vec<_> = db.scan_prefix(list_agent_prefix(&agent)).collect();
    assert_eq!(keys.len(), 1);
    let (key, value) = keys[0].as_ref().unwrap();
    assert_eq!(
        key.as_ref(),
        listing_key(&list_agent_prefix(&agent), &listing::entry(2, &t[1].id))
    );
    assert!(value.is_empty());
    // New tasks after the purge still list above it.
    let more = accepted(one_commit(&store, submits_at(&agent, &[2, 9])));
    let mut all = vec![t[1].clone()];
    all.extend(more);
    assert_eq!(walk(&store, None, None, None, 1), newest_first(&all));
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
    /// Against a model (the set of live tasks): random group commits of tasks at random
    /// times for two agents, completions and purges between them, a reopen in the middle,
    /// and walks in pages of random sizes with random bounds.
    #[test]
    fn the_listing_is_every_live_task_newest_first_whatever_the_commits(
        commits in proptest::collection::vec(
            (proptest::collection::vec((0u64..40, proptest::prelude::any::<bool>()), 0..8),
             proptest::prelude::any::<bool>()),
            1..8,
        ),
        limit in 1usize..6,
        since in proptest::option::of(0u64..40),
        until in proptest::option::of(0u64..45),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (a, b): (AgentId, AgentId) = ("a".parse().unwrap(), "b".parse().unwrap());
        let mut store = SledStore::open(dir.path()).unwrap();
        let mut live: Vec<Task> = Vec::new();
        for (i, (submissions, purge)) in commits.iter().enumerate() {
            let writes = submissions
                .iter()
                .flat_map(|&(ms, of_a)| submits_at(if of_a { &a } else { &b }, &[ms]))
                .collect();
            live.extend(accepted(one_commit(&store, writes)));
            if *purge {
                // Every other live task finishes and goes.
                let (gone, kept): (Vec<_>, Vec<_>) =
                    live.drain(..).enumerate().partition(|(j, _)| j % 2 == 0);
                for (_, t) in &gone {
                    let mut done = t.clone();
                    done.status = TaskStatus::Success;
                    done.finished_at = Some(1);
                    complete(&store, &done);
                }
                proptest::prop_assert_eq!(store.purge(Duration::ZERO).unwrap().tasks, gone.len());
                live = kept.into_iter().map(|(_, t)| t).collect();
            }
            if i == commits.len() / 2 {
                drop(store);
                store = reopen(dir.path());
            }
        }
        let within = |t: &&Task| {
            since.is_none_or(|s| t.created_at >= s) && until.is_none_or(|u| t.created_at < u)
        };
        let all: Vec<Task> = live.iter().filter(within).cloned().collect();
        proptest::prop_assert_eq!(walk(&store, None, since, until, limit), newest_first(&all));
        let of_a: Vec<Task> = all.iter().filter(|t| t.agent == a).cloned().collect();
        proptest::prop_assert_eq!(walk(&store, Some(&a), since, until, limit), newest_first(&of_a));
        proptest::prop_assert!(store.unreadable_records().is_empty());
    }
}
