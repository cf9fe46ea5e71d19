//! `haul coordinator`: the cluster's gRPC coordinator.

use haul::cli::CoordinatorArgs;
use haul_coordinator::cluster::{self, CoordinatorOptions};
use haul_shared::pg::Secret;

pub(super) async fn run(a: CoordinatorArgs) -> anyhow::Result<()> {
    let opts = CoordinatorOptions {
        advertise: a.advertise_url(),
        listen: a.listen,
        amqp: Secret::new(a.cluster.amqp.clone()),
        redis: Secret::new(a.cluster.redis.clone()),
        amqp_tls: a.cluster.amqp_tls(),
        redis_tls: a.cluster.redis_tls(),
        queue: a.cluster.queue,
        redis_prefix: a.cluster.redis_prefix,
        max_attempts: a.cluster.max_attempts,
        token: a.serve.token(),
        tls: a.serve.tls(),
        parallelism: a.parallelism,
        loader_tls_ca: a.loader_tls_ca,
        metrics_listen: a.metrics_listen,
        source_credentials: a.login.credentials(),
    };
    let shutdown =
        super::stop_on_signal("stopping; unfinished jobs stay recorded for the next coordinator")?;
    cluster::serve(opts, shutdown).await?;
    Ok(())
}
