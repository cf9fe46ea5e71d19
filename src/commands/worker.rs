//! `haul worker`: extracts chunks from the queue until drained.

use std::time::Duration;

use haul::cli::WorkerArgs;
use haul_shared::pg::Secret;
use haul_worker::node::{NodeOptions, run_node};

pub(super) async fn run(a: WorkerArgs) -> anyhow::Result<()> {
    let opts = NodeOptions {
        id: a.id,
        coordinator: a.client.options(),
        amqp: Secret::new(a.cluster.amqp.clone()),
        redis: Secret::new(a.cluster.redis.clone()),
        amqp_tls: a.cluster.amqp_tls(),
        redis_tls: a.cluster.redis_tls(),
        queue: a.cluster.queue,
        redis_prefix: a.cluster.redis_prefix,
        slots: a.slots,
        lease_ttl: Duration::from_secs(a.lease_ttl_secs),
        max_attempts: a.cluster.max_attempts,
        drain_grace: a.drain_grace_secs.map(Duration::from_secs),
        metrics_listen: a.metrics_listen,
        source_credentials: a.login.credentials(),
    };
    run_node(opts).await?;
    Ok(())
}
