//! Conformance suites for the boundary traits. Every implementation (in-process, RabbitMQ,
//! Redis) runs the same suite, so a fake can never drift from the real thing. The suites
//! panic on the first violated clause of the contract.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;

use crate::jobs::{ChunkState, JobRecord, JobSpec, JobState, JobStore, OutputOptions};
use crate::lease::LeaseStore;
use crate::queue::ChunkQueue;
use crate::{ChunkId, JobId, WorkerId};

const QUIET: Duration = Duration::from_millis(300);

/// Runs the queue contract against fresh queues from `make(max_deliveries)`.
pub async fn queue_suite<Q, F, Fut>(make: F)
where
    Q: ChunkQueue,
    F: Fn(u32) -> Fut,
    Fut: Future<Output = Q>,
{
    // Delivered once each, acked, gone.
    let q = make(3).await;
    for i in 0..3u8 {
        q.publish(Bytes::from(vec![i])).await.unwrap();
    }
    let mut sub = q.subscribe(3).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..3 {
        let d = sub.next().await.unwrap();
        assert_eq!(d.attempt, 1, "first delivery is attempt 1");
        seen.push(d.body[0]);
        d.ack().await.unwrap();
    }
    seen.sort();
    assert_eq!(seen, vec![0, 1, 2]);
    assert!(
        tokio::time::timeout(QUIET, sub.next()).await.is_err(),
        "acked messages must not come back"
    );
    drop(sub);

    // Nacked: redelivered with a growing attempt, dead-lettered after exactly 3 attempts.
    let q = make(3).await;
    q.publish(Bytes::from_static(b"poison")).await.unwrap();
    let mut sub = q.subscribe(1).await.unwrap();
    for attempt in 1..=3 {
        let d = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("a nacked message is redelivered")
            .unwrap();
        assert_eq!(d.attempt, attempt);
        assert_eq!(&d.body[..], b"poison");
        d.nack().await.unwrap();
    }
    assert!(
        tokio::time::timeout(QUIET, sub.next()).await.is_err(),
        "no delivery past the limit"
    );
    let dead = wait_dead_letters(&q, 1).await;
    assert_eq!(dead, vec![Bytes::from_static(b"poison")]);
    drop(sub);

    // Rejected: dead-lettered at once.
    let q = make(5).await;
    q.publish(Bytes::from_static(b"bad")).await.unwrap();
    let mut sub = q.subscribe(1).await.unwrap();
    sub.next().await.unwrap().reject().await.unwrap();
    assert_eq!(
        wait_dead_letters(&q, 1).await,
        vec![Bytes::from_static(b"bad")]
    );
    assert!(tokio::time::timeout(QUIET, sub.next()).await.is_err());
    drop(sub);

    // The dead-letter queue can be consumed: a dead letter is delivered, a nack puts it
    // back, an ack removes it.
    let q = make(1).await;
    q.publish(Bytes::from_static(b"gone")).await.unwrap();
    let mut sub = q.subscribe(1).await.unwrap();
    sub.next().await.unwrap().nack().await.unwrap(); // past the limit of 1
    let mut dead = q.subscribe_dead_letters(1).await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(10), dead.next())
        .await
        .expect("a dead letter is delivered to its consumer")
        .unwrap();
    assert_eq!(&d.body[..], b"gone");
    d.nack().await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(10), dead.next())
        .await
        .expect("a nacked dead letter comes back")
        .unwrap();
    assert_eq!(&d.body[..], b"gone");
    d.ack().await.unwrap();
    assert!(
        tokio::time::timeout(QUIET, dead.next()).await.is_err(),
        "an acked dead letter is gone"
    );
    assert!(q.drain_dead_letters().await.unwrap().is_empty());
    drop(dead);
    drop(sub);

    // Prefetch bounds unsettled deliveries; a consumer that goes away returns its messages.
    let q = make(5).await;
    q.publish(Bytes::from_static(b"a")).await.unwrap();
    q.publish(Bytes::from_static(b"b")).await.unwrap();
    let mut sub = q.subscribe(1).await.unwrap();
    let first = sub.next().await.unwrap();
    assert!(
        tokio::time::timeout(QUIET, sub.next()).await.is_err(),
        "prefetch 1 allows one unsettled delivery"
    );
    drop(first);
    drop(sub);
    let mut sub2 = q.subscribe(2).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        let d = tokio::time::timeout(Duration::from_secs(10), sub2.next())
            .await
            .expect("messages of a vanished consumer are redelivered")
            .unwrap();
        got.push((d.body.clone(), d.attempt));
        d.ack().await.unwrap();
    }
    got.sort();
    assert_eq!(
        got,
        vec![(Bytes::from_static(b"a"), 2), (Bytes::from_static(b"b"), 1)],
        "the dropped delivery comes back as attempt 2, the unstarted one as attempt 1"
    );
    drop(sub2);

    // Cancel (drain): no new deliveries, the taken one can still be acked, the rest go
    // to the next consumer.
    let q = make(5).await;
    for b in [b"x", b"y", b"z"] {
        q.publish(Bytes::from_static(b)).await.unwrap();
    }
    let mut sub = q.subscribe(2).await.unwrap();
    let taken = sub.next().await.unwrap();
    sub.cancel().await.unwrap();
    assert!(
        tokio::time::timeout(QUIET, sub.next())
            .await
            .map(|r| r.is_err())
            .unwrap_or(true),
        "a cancelled subscription delivers nothing more"
    );
    let taken_body = taken.body.clone();
    taken
        .ack()
        .await
        .expect("a delivery taken before cancel can be acked");
    let mut sub2 = q.subscribe(5).await.unwrap();
    let mut rest = Vec::new();
    for _ in 0..2 {
        let d = tokio::time::timeout(Duration::from_secs(10), sub2.next())
            .await
            .expect("what the cancelled consumer had not started is delivered again")
            .unwrap();
        rest.push(d.body.clone());
        d.ack().await.unwrap();
    }
    assert!(!rest.contains(&taken_body), "the acked delivery is gone");
    assert!(tokio::time::timeout(QUIET, sub2.next()).await.is_err());
    drop(sub);
}

async fn wait_dead_letters<Q: ChunkQueue>(q: &Q, n: usize) -> Vec<Bytes> {
    let mut dead = Vec::new();
    for _ in 0..100 {
        dead.extend(q.drain_dead_letters().await.unwrap());
        if dead.len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    dead
}

/// Runs the lease contract; `prefix` keeps keys of concurrent runs apart.
pub async fn lease_suite<S: LeaseStore>(store: &S, prefix: &str) {
    let key = format!("{prefix}lease-a");
    let (w1, w2) = (WorkerId("w1".into()), WorkerId("w2".into()));
    let ttl = Duration::from_millis(500);

    let l1 = store
        .acquire(&key, &w1, ttl)
        .await
        .unwrap()
        .expect("free lease");
    assert!(
        store.acquire(&key, &w2, ttl).await.unwrap().is_none(),
        "held lease is exclusive"
    );
    assert!(store.is_current(&l1).await.unwrap());
    assert_eq!(store.holder(&key).await.unwrap(), Some(w1.clone()));
    assert!(store.renew(&l1, ttl).await.unwrap(), "current lease renews");

    // Expiry: another holder takes it with a larger epoch; the old one is fenced off.
    tokio::time::sleep(ttl + Duration::from_millis(300)).await;
    assert!(
        !store.is_current(&l1).await.unwrap(),
        "expired lease is not current"
    );
    assert_eq!(
        store.holder(&key).await.unwrap(),
        None,
        "nobody holds an expired lease"
    );
    let l2 = store
        .acquire(&key, &w2, ttl)
        .await
        .unwrap()
        .expect("expired lease is free");
    assert!(l2.epoch > l1.epoch, "epochs grow");
    assert!(
        !store.renew(&l1, ttl).await.unwrap(),
        "a superseded lease cannot renew"
    );
    assert!(!store.is_current(&l1).await.unwrap());
    store.release(&l1).await.unwrap();
    assert!(
        store.is_current(&l2).await.unwrap(),
        "releasing a stale lease is a no-op"
    );

    // Release frees it; the epoch still grows.
    store.release(&l2).await.unwrap();
    assert!(!store.is_current(&l2).await.unwrap());
    let l3 = store
        .acquire(&key, &w1, ttl)
        .await
        .unwrap()
        .expect("released lease is free");
    assert!(l3.epoch > l2.epoch);

    // Evicting a holder (a dead worker) frees its lease at once, only if it holds it; the
    // next epoch is larger and the evicted lease is no longer current.
    assert!(
        !store.evict(&key, &w2).await.unwrap(),
        "w2 does not hold it"
    );
    assert!(store.is_current(&l3).await.unwrap());
    assert!(store.evict(&key, &w1).await.unwrap());
    assert!(!store.is_current(&l3).await.unwrap());
    let l4 = store
        .acquire(&key, &w2, ttl)
        .await
        .unwrap()
        .expect("an evicted lease is free");
    assert!(l4.epoch > l3.epoch);
    store.release(&l4).await.unwrap();
    let l3 = store
        .acquire(&key, &w1, ttl)
        .await
        .unwrap()
        .expect("a released lease is free");

    // An expired lease is not revived by renew, even if nobody took it.
    tokio::time::sleep(ttl + Duration::from_millis(300)).await;
    assert!(!store.renew(&l3, ttl).await.unwrap());
    store.release(&l3).await.unwrap();
}

/// Runs the job-store contract with job ids unique to this run.
pub async fn job_store_suite<S: JobStore>(store: &S) {
    let id = JobId::generate();
    let mut job = JobRecord {
        id: id.clone(),
        spec: JobSpec {
            source: "host=h dbname=db user=u sslmode=verify-full"
                .parse()
                .unwrap(),
            table: "public.t".into(),
            columns: vec![],
            key: vec![],
            split: Default::default(),
            casts: BTreeMap::new(),
            dest: "file:///tmp/x".into(),
            chunk_rows: 10,
            output: OutputOptions::default(),
            use_snapshot: true,
            load: None,
            incremental: None,
            retry_for_secs: 600,
        },
        plan: None,
        state: JobState::Planning,
        submitted_at: String::new(),
    };
    assert!(store.get_job(&id).await.unwrap().is_none());
    store.put_job(&job).await.unwrap();
    assert!(store.list_jobs().await.unwrap().contains(&id));
    let back = store.get_job(&id).await.unwrap().unwrap();
    assert_eq!(
        back.spec.source.to_string(),
        "host=h dbname=db user=u sslmode=verify-full"
    );
    assert_eq!(back.state, JobState::Planning);

    store
        .set_chunk_state(
            &id,
            ChunkId(1),
            &ChunkState::Committed { rows: 5, bytes: 9 },
        )
        .await
        .unwrap();
    store
        .set_chunk_state(&id, ChunkId(0), &ChunkState::Pending)
        .await
        .unwrap();
    job.state = JobState::Running;
    store.put_job(&job).await.unwrap();
    let chunks = store.chunk_states(&id).await.unwrap();
    assert_eq!(chunks.len(), 2, "re-putting a job keeps its chunk states");
    assert_eq!(
        chunks[&ChunkId(1)],
        ChunkState::Committed { rows: 5, bytes: 9 }
    );

    // a committed chunk stays committed, whatever a late attempt writes
    for late in [
        ChunkState::Pending,
        ChunkState::Parked,
        ChunkState::Failed {
            reason: "zombie".into(),
        },
    ] {
        store.set_chunk_state(&id, ChunkId(1), &late).await.unwrap();
    }
    assert_eq!(
        store.chunk_states(&id).await.unwrap()[&ChunkId(1)],
        ChunkState::Committed { rows: 5, bytes: 9 }
    );
    store
        .set_chunk_state(&id, ChunkId(0), &ChunkState::Parked)
        .await
        .unwrap();
    assert_eq!(
        store.chunk_states(&id).await.unwrap()[&ChunkId(0)],
        ChunkState::Parked
    );

    // a waiting chunk's backoff round-trips
    let waiting = ChunkState::Waiting {
        retry_at_ms: 1_700_000_000_000,
        retry: crate::jobs::Retry {
            failures: 2,
            since_ms: 1_699_999_999_000,
        },
        reason: "loader unavailable".into(),
    };
    store
        .set_chunk_state(&id, ChunkId(0), &waiting)
        .await
        .unwrap();
    assert_eq!(store.chunk_states(&id).await.unwrap()[&ChunkId(0)], waiting);

    // dead letters: one per chunk (the later replaces), listed by chunk, forgotten on
    // request
    assert!(store.dead_letters(&id).await.unwrap().is_empty());
    let dead = |chunk, reason: &str| crate::jobs::DeadLetter {
        chunk: ChunkId(chunk),
        reason: reason.into(),
        at_ms: 7,
    };
    for d in [dead(3, "first"), dead(0, "zero"), dead(3, "again")] {
        store.add_dead_letter(&id, &d).await.unwrap();
    }
    assert_eq!(
        store.dead_letters(&id).await.unwrap(),
        [dead(0, "zero"), dead(3, "again")]
    );
    store
        .remove_dead_letters(&id, &[ChunkId(3), ChunkId(9)])
        .await
        .unwrap();
    assert_eq!(store.dead_letters(&id).await.unwrap(), [dead(0, "zero")]);

    let failed = JobState::Failed {
        reason: "boom".into(),
    };
    store.set_job_state(&id, &failed).await.unwrap();
    assert_eq!(store.get_job(&id).await.unwrap().unwrap().state, failed);
    assert_eq!(store.job_state(&id).await.unwrap(), Some(failed));
    assert_eq!(store.job_state(&JobId::generate()).await.unwrap(), None);

    // planned again (the same id to another destination, say): nothing of the old plan's
    // chunks or dead letters is read as the new one's, committed ones included
    job.state = JobState::Planning;
    job.spec.dest = "file:///tmp/elsewhere".into();
    store.replan_job(&job).await.unwrap();
    let back = store.get_job(&id).await.unwrap().unwrap();
    assert_eq!(back.state, JobState::Planning);
    assert_eq!(back.spec.dest, "file:///tmp/elsewhere");
    assert!(store.chunk_states(&id).await.unwrap().is_empty());
    assert!(store.dead_letters(&id).await.unwrap().is_empty());
    assert!(store.list_jobs().await.unwrap().contains(&id));
}
