//! The Flight face of `haul loader`: DoPut of a chunk's batches, the `prepare` action,
//! and the server's bootstrap (TLS, token, health, metrics).

use std::pin::Pin;
use std::sync::Arc;

use crate::metrics;
use crate::pg::{self, Secret};
use crate::proto::wire::{ChunkEnd, PrepareLoad};
use arrow_flight::decode::{DecodedPayload, FlightDataDecoder};
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaResult, Ticket,
};
use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use prost::Message;
use tonic::{Request, Response, Status, Streaming};

use super::PREPARE_ACTION;
use super::error::LoadError;
use super::ledger::{Loader, decode_command};

/// The Flight service of `haul loader`.
#[derive(Clone)]
pub struct LoaderService {
    pub loader: Arc<Loader>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl FlightService for LoaderService {
    type HandshakeStream = BoxStream<HandshakeResponse>;
    type ListFlightsStream = BoxStream<FlightInfo>;
    type DoGetStream = BoxStream<FlightData>;
    type DoPutStream = BoxStream<PutResult>;
    type DoActionStream = BoxStream<arrow_flight::Result>;
    type ListActionsStream = BoxStream<ActionType>;
    type DoExchangeStream = BoxStream<FlightData>;

    async fn handshake(
        &self,
        _: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        Err(Status::unimplemented(
            "no handshake: send the bearer token as an authorization header",
        ))
    }

    async fn list_flights(
        &self,
        _: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        Err(Status::unimplemented(
            "a loader does not serve jobs; ask the coordinator",
        ))
    }

    async fn get_flight_info(
        &self,
        _: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        Err(Status::unimplemented(
            "a loader does not serve jobs; ask the coordinator",
        ))
    }

    async fn poll_flight_info(
        &self,
        _: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        Err(Status::unimplemented("poll_flight_info"))
    }

    async fn get_schema(
        &self,
        _: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        Err(Status::unimplemented("get_schema"))
    }

    async fn do_get(&self, _: Request<Ticket>) -> Result<Response<Self::DoGetStream>, Status> {
        Err(Status::unimplemented(
            "a loader does not serve jobs; ask the coordinator",
        ))
    }

    async fn do_put(
        &self,
        request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        let mut input = request.into_inner();
        let first = input
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty DoPut"))?;
        let desc = first
            .flight_descriptor
            .clone()
            .ok_or_else(|| Status::invalid_argument("DoPut without a LoadChunk descriptor"))?;
        let cmd = decode_command(&desc).map_err(|e| crate::error::to_status(&e))?;
        let (job, chunk, epoch) = (cmd.job.clone(), cmd.chunk, cmd.epoch);
        let data =
            futures::stream::once(async move { Ok(first) }).chain(input.map_err(FlightError::from));
        // the chunk's batches; its end (the rows the worker sent) is kept aside
        let end = Arc::new(std::sync::Mutex::new(None::<u64>));
        let seen_end = Arc::clone(&end);
        let batches = FlightDataDecoder::new(data).filter_map(move |m| {
            let seen_end = Arc::clone(&seen_end);
            async move {
                match m {
                    Err(e) => Some(Err(e)),
                    Ok(d) => match d.payload {
                        DecodedPayload::RecordBatch(b) => {
                            let meta = d.inner.app_metadata;
                            if meta.is_empty() {
                                return Some(Ok(b));
                            }
                            match ChunkEnd::decode(meta) {
                                Ok(e) => {
                                    if let Ok(mut slot) = seen_end.lock() {
                                        *slot = Some(e.rows);
                                    }
                                    None
                                }
                                Err(e) => Some(Err(FlightError::DecodeError(format!(
                                    "a batch's metadata is not a ChunkEnd: {e}"
                                )))),
                            }
                        }
                        DecodedPayload::Schema(_) | DecodedPayload::None => None,
                    },
                }
            }
        });
        let ack = self
            .loader
            .load_chunk(cmd, batches, end)
            .await
            .map_err(|e| {
                tracing::warn!(%job, chunk, epoch, error = %e, "chunk not loaded");
                crate::error::to_status(&e)
            })?;
        let result = PutResult {
            app_metadata: ack.encode_to_vec().into(),
        };
        Ok(Response::new(Box::pin(futures::stream::once(async move {
            Ok(result)
        }))))
    }

    async fn do_exchange(
        &self,
        _: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        Err(Status::unimplemented("do_exchange"))
    }

    async fn do_action(
        &self,
        request: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        let action = request.into_inner();
        if action.r#type != PREPARE_ACTION {
            return Err(Status::unimplemented(format!(
                "unknown action {:?}; a loader knows {PREPARE_ACTION:?}",
                action.r#type
            )));
        }
        let req = PrepareLoad::decode(action.body)
            .map_err(|e| Status::invalid_argument(format!("malformed PrepareLoad: {e}")))?;
        let reply = self
            .loader
            .prepare(req)
            .await
            .map_err(|e| crate::error::to_status(&e))?;
        let body: Bytes = reply.encode_to_vec().into();
        Ok(Response::new(Box::pin(futures::stream::once(async move {
            Ok(arrow_flight::Result { body })
        }))))
    }

    async fn list_actions(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        let t = ActionType {
            r#type: PREPARE_ACTION.into(),
            description: "Create/check/empty the target table of a job, once per job".into(),
        };
        Ok(Response::new(Box::pin(futures::stream::once(async move {
            Ok(t)
        }))))
    }
}

/// How `haul loader` (or `haul run --load-target`) serves.
#[derive(Clone, Debug)]
pub struct LoaderOptions {
    pub target: pg::Database,
    /// Schema of the ledger tables in the target.
    pub ledger_schema: String,
    /// Require this bearer token on every RPC.
    pub token: Option<Secret>,
    /// TLS certificate and key (PEM).
    pub tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// Serves the loader's Flight service (and gRPC health) on `listener` until `shutdown`
/// fires. The ledger is created first, so a target that cannot take it fails at start.
pub async fn serve(
    listener: tokio::net::TcpListener,
    opts: LoaderOptions,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), LoadError> {
    use arrow_flight::flight_service_server::FlightServiceServer;
    use tonic::transport::{Identity, Server, ServerTlsConfig};

    let loader = Arc::new(Loader::new(opts.target.clone(), opts.ledger_schema.clone()));
    loader.ensure_ledger().await?;
    if let Some(addr) = opts.metrics_listen {
        let m = Arc::clone(&loader.metrics);
        let render: metrics::Render = Arc::new(move || {
            let text = m.render();
            Box::pin(async move { text })
        });
        // ready when the target takes a connection (a login with the loader's credentials)
        let target = opts.target.clone();
        let ready: metrics::Ready = Arc::new(move || {
            let target = target.clone();
            Box::pin(async move {
                match pg::connect(&target).await {
                    Ok(_) => Ok("target reachable".to_owned()),
                    Err(e) => Err(format!("target unreachable: {e}")),
                }
            })
        });
        metrics::spawn(addr, render, ready, shutdown.clone())
            .await
            .map_err(|e| LoadError::Serve(format!("metrics on {addr}: {e}")))?;
    }
    let mut builder = Server::builder()
        .initial_stream_window_size(4 << 20)
        .initial_connection_window_size(8 << 20);
    if let Some((cert, key)) = &opts.tls {
        let read = |p: &std::path::PathBuf| {
            std::fs::read(p).map_err(|e| {
                LoadError::Serve(format!("cannot read the TLS file {}: {e}", p.display()))
            })
        };
        let identity = Identity::from_pem(read(cert)?, read(key)?);
        builder = builder
            .tls_config(ServerTlsConfig::new().identity(identity))
            .map_err(|e| LoadError::Serve(format!("TLS: {e}")))?;
    }
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<FlightServiceServer<LoaderService>>()
        .await;
    let auth = crate::rpc::RequireToken::new(opts.token.as_ref());
    let flight =
        FlightServiceServer::new(LoaderService { loader }).max_decoding_message_size(256 << 20);
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    tracing::info!(listen = %addr, target = %opts.target, tls = opts.tls.is_some(), token = opts.token.is_some(), "loader serving");
    builder
        .add_service(health_service)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            flight, auth,
        ))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            shutdown.cancelled_owned(),
        )
        .await
        .map_err(|e| LoadError::Serve(crate::rpc::error_chain(&e)))
}
