//! The coordinator's server: connects its stores, then serves gRPC (the `Jobs`, `Admin`
//! and `Membership` services, Flight DoGet for readers, health, reflection), with TLS and
//! the bearer token when configured, and `/metrics`.

use std::path::PathBuf;
use std::sync::Arc;

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
    let coordinator = match Coordinator::start(opts.clone(), shutdown.clone()).await {
        Ok(c) => c,
        // stopped while standing by for the active coordinator: nothing to clean up
        Err(_) if shutdown.is_cancelled() => return Ok(()),
        Err(e) => return Err(e),
    };
    if let Some(addr) = opts.metrics_listen {
        let c = Arc::clone(&coordinator);
        let render: haul_shared::metrics::Render = Arc::new(move || {
            let c = Arc::clone(&c);
            Box::pin(async move { c.metrics().await })
        });
        haul_shared::metrics::spawn(addr, render, shutdown.clone())
            .await
            .map_err(|e| CoordinatorError::Serve(format!("cannot serve metrics on {addr}: {e}")))?;
    }
    let flight = crate::flight::JobsFlight {
        jobs: Arc::new(coordinator.store.clone()),
    };
    let lease_lost = coordinator.lease_lost.clone();
    let api = Api(coordinator);
    let auth = RequireToken::new(opts.token.as_ref());

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<JobsServer<Api>>().await;
    health.set_serving::<AdminServer<Api>>().await;
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
    info!(
        listen = %opts.listen,
        tls = opts.tls.is_some(),
        token = opts.token.is_some(),
        queue = %opts.queue,
        "coordinator serving"
    );
    builder
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
        .serve_with_shutdown(opts.listen, shutdown.cancelled_owned())
        .await
        .map_err(|e| CoordinatorError::Serve(haul_shared::rpc::error_chain(&e)))?;
    if lease_lost.is_cancelled() {
        return Err(CoordinatorError::LeaseLost);
    }
    Ok(())
}
