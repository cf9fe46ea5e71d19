//! The coordinator's server: connects its stores, then serves gRPC (the `Jobs`, `Admin`
//! and `Membership` services, Flight DoGet for readers, health, reflection), with TLS and
//! the bearer token when configured, and `/metrics`.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use haul_shared::metrics;
use haul_shared::redis_store::RedisStore;

use haul_shared::proto::wire::{
    admin_server::AdminServer, jobs_server::JobsServer, membership_server::MembershipServer,
};
use haul_shared::rpc::RequireToken;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tracing::info;

use super::service::Api;
use super::{Coordinator, CoordinatorError, CoordinatorOptions};

/// Serves the coordinator until `shutdown` fires.
pub async fn serve(
    opts: CoordinatorOptions,
    shutdown: CancellationToken,
) -> Result<(), CoordinatorError> {
    let store =
        RedisStore::connect_with_tls(opts.redis.expose(), &opts.redis_prefix, &opts.redis_tls)
            .await?;
    // health and metrics answer while this coordinator stands by, too
    let active: Arc<OnceLock<Arc<Coordinator>>> = Arc::default();
    if let Some(addr) = opts.metrics_listen {
        let a = Arc::clone(&active);
        let render: metrics::Render = Arc::new(move || {
            let a = Arc::clone(&a);
            Box::pin(async move {
                match a.get() {
                    Some(c) => c.metrics().await,
                    None => Coordinator::standby_metrics(),
                }
            })
        });
        let (a, store) = (Arc::clone(&active), store.clone());
        let ready: metrics::Ready = Arc::new(move || {
            let (a, store) = (Arc::clone(&a), store.clone());
            Box::pin(async move {
                store
                    .ping()
                    .await
                    .map_err(|e| format!("Redis unreachable: {e}"))?;
                match a.get() {
                    Some(c) => c.ready().await,
                    None => Ok("standby".to_owned()),
                }
            })
        });
        metrics::spawn(addr, render, ready, shutdown.clone())
            .await
            .map_err(|e| CoordinatorError::Serve(format!("cannot serve metrics on {addr}: {e}")))?;
    }
    // gRPC is served from the start: a standby answers where the active coordinator is
    // (and serves worker heartbeats, which only touch the store); health says which it is
    let flight = crate::flight::JobsFlight {
        jobs: Arc::new(store.clone()),
    };
    let api = Api {
        active: Arc::clone(&active),
        store: store.clone(),
        advertise: opts.advertise.clone(),
    };
    let auth = RequireToken::new(opts.token.as_ref());
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_not_serving::<JobsServer<Api>>().await;
    health.set_not_serving::<AdminServer<Api>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(haul_shared::proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| CoordinatorError::Serve(e.to_string()))?;

    let mut builder = Server::builder();
    if let Some((cert, key)) = &opts.tls {
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|e| CoordinatorError::TlsFile {
                path: p.display().to_string(),
                reason: e.to_string(),
            })
        };
        let identity = Identity::from_pem(read(cert)?, read(key)?);
        builder = builder
            .tls_config(ServerTlsConfig::new().identity(identity))
            .map_err(|e| CoordinatorError::Serve(e.to_string()))?;
    }
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|e| CoordinatorError::Serve(format!("cannot listen on {}: {e}", opts.listen)))?;
    info!(
        listen = %opts.listen,
        advertise = %opts.advertise,
        tls = opts.tls.is_some(),
        token = opts.token.is_some(),
        queue = %opts.queue,
        "coordinator serving"
    );
    let serving = shutdown.child_token();
    let server = builder
        .add_service(health_service)
        // reflection describes the API: with a token set, only to callers that have it
        .add_service(tonic::service::interceptor::InterceptedService::new(
            reflection,
            auth.clone(),
        ))
        .add_service(JobsServer::with_interceptor(api.clone(), auth.clone()))
        .add_service(AdminServer::with_interceptor(api.clone(), auth.clone()))
        .add_service(MembershipServer::with_interceptor(api, auth.clone()))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            arrow_flight::flight_service_server::FlightServiceServer::new(flight),
            auth,
        ))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            serving.clone().cancelled_owned(),
        );
    let server = tokio::spawn(server);

    let coordinator = match Coordinator::start(store, opts.clone(), shutdown.clone()).await {
        Ok(c) => c,
        Err(e) => {
            serving.cancel();
            let _ = server.await;
            // stopped while standing by for the active coordinator: nothing to clean up
            return if shutdown.is_cancelled() {
                Ok(())
            } else {
                Err(e)
            };
        }
    };
    let _ = active.set(Arc::clone(&coordinator));
    health.set_serving::<JobsServer<Api>>().await;
    health.set_serving::<AdminServer<Api>>().await;
    let lease_lost = coordinator.lease_lost.clone();
    server
        .await
        .map_err(|e| CoordinatorError::Serve(e.to_string()))?
        .map_err(|e| CoordinatorError::Serve(haul_shared::rpc::error_chain(&e)))?;
    if lease_lost.is_cancelled() {
        return Err(CoordinatorError::LeaseLost);
    }
    Ok(())
}
