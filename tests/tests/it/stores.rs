//! The cluster's store implementations pass the same conformance suites as the
//! in-process ones, against the real Redis on this machine.

use haul_shared::redis_store::RedisStore;

use crate::harness::*;

#[tokio::test]
async fn redis_store_conforms_to_the_lease_and_job_store_contracts() {
    let prefix = format!("{}:", unique("haul_test"));
    let _guard = KeysGuard(prefix.clone());
    let store = RedisStore::connect(&redis_url(), &prefix)
        .await
        .expect("Redis at HAUL_TEST_REDIS (scripts/services.sh starts it)");
    haul_shared::conformance::lease_suite(&store, "").await;
    haul_shared::conformance::job_store_suite(&store).await;

    // teardown removes everything under the prefix
    store.delete_all().await.unwrap();
    let left: Vec<String> = {
        let out = std::process::Command::new("redis-cli")
            .args([
                "-u",
                &redis_url(),
                "--scan",
                "--pattern",
                &format!("{prefix}*"),
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    };
    assert!(left.is_empty(), "delete_all left {left:?}");
}

#[tokio::test]
async fn rabbitmq_queue_conforms_to_the_queue_contract() {
    use haul_shared::rabbit_queue::RabbitQueue;
    // the broker-blip test closes every connection; not while this suite runs
    let _broker = crate::harness::BROKER.read().await;
    let guard = QueuesGuard::default();
    haul_shared::conformance::queue_suite(|max| {
        let name = unique("haul_test_q");
        guard.0.lock().unwrap().push(name.clone());
        async move {
            RabbitQueue::connect(&amqp_url(), &name, max)
                .await
                .expect("RabbitMQ at HAUL_TEST_AMQP (scripts/services.sh starts it)")
        }
    })
    .await;
}

/// Regression (issue 12): the epoch counters live in Redis, so a Redis that lost its data
/// (FLUSHALL, a failover to an empty replica) handed out epoch 1 again, below epochs
/// already fenced with (a loader refuses an attempt older than one it committed). Epochs
/// now keep growing across such a loss, and the old lease is still fenced off.
#[tokio::test]
async fn lease_epochs_keep_growing_after_redis_loses_its_data() {
    use haul_shared::WorkerId;
    use haul_shared::lease::LeaseStore;
    use std::time::Duration;
    let prefix = format!("{}:", unique("haul_test"));
    let _guard = KeysGuard(prefix.clone());
    let store = RedisStore::connect(&redis_url(), &prefix).await.unwrap();
    let ttl = Duration::from_secs(60);
    let mut last = None;
    for _ in 0..3 {
        let l = store
            .acquire("j/000001", &WorkerId("w".into()), ttl)
            .await
            .unwrap()
            .unwrap();
        store.release(&l).await.unwrap();
        last = Some(l);
    }
    let before = last.unwrap();
    let held = store
        .acquire("j/000001", &WorkerId("old".into()), ttl)
        .await
        .unwrap()
        .unwrap();
    assert!(held.epoch > before.epoch);
    store.delete_all().await.unwrap(); // the data is lost
    let after = store
        .acquire("j/000001", &WorkerId("new".into()), ttl)
        .await
        .unwrap()
        .unwrap();
    assert!(
        after.epoch > held.epoch,
        "{:?} after {:?}",
        after.epoch,
        held.epoch
    );
    assert!(
        !store.is_current(&held).await.unwrap(),
        "the old lease is fenced off"
    );
    assert!(store.is_current(&after).await.unwrap());
}
