//! Arrow Flight for readers, on the coordinator's port: a committed job's rows stream out
//! of its Parquet output (ticket = job id), so `pyarrow.flight` or any Flight client can
//! read an export without access to the object store.
//!
//! - `ListFlights`: the succeeded jobs, each with its schema and row count.
//! - `GetFlightInfo` / `GetSchema`: one job, by a descriptor whose path (or command) is
//!   the job id.
//! - `DoGet`: the job's rows, file by file in the order of its manifest; memory stays
//!   bounded by one batch per file being read.

use std::pin::Pin;
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightEndpoint, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaAsIpc, SchemaResult, Ticket,
};
use arrow_schema::{Schema, SchemaRef};
use futures::{Stream, StreamExt, TryStreamExt};
use haul_shared::JobId;
use haul_shared::jobs::{JobRecord, JobState, JobStore};
use haul_shared::lake::reader::PartReader;
use haul_shared::lake::{Dest, JobManifest};
use parquet::arrow::ParquetRecordBatchStreamBuilder;
use tonic::{Request, Response, Status, Streaming};

/// Rows per batch sent to a reader.
const READ_BATCH_ROWS: usize = 32 * 1024;

/// The coordinator's Flight service.
#[derive(Clone)]
pub struct JobsFlight {
    pub jobs: Arc<dyn JobStore>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

impl JobsFlight {
    /// A succeeded job, its schema and manifest.
    async fn committed(
        &self,
        id: &str,
    ) -> Result<(JobRecord, SchemaRef, JobManifest, Dest), Status> {
        let job = JobId::parse(id).map_err(Status::invalid_argument)?;
        let rec = self
            .jobs
            .get_job(&job)
            .await
            .map_err(|e| Status::unavailable(format!("job store: {e}")))?
            .ok_or_else(|| Status::not_found(format!("no job {job}; `haul jobs` lists them")))?;
        if rec.state != JobState::Succeeded {
            return Err(Status::failed_precondition(format!(
                "job {job} is {}; only a succeeded job's rows can be read",
                rec.state.name()
            )));
        }
        if !rec.spec.output.parquet {
            return Err(Status::failed_precondition(format!(
                "job {job} wrote no Parquet (--no-parquet); read its target table instead"
            )));
        }
        let dest = Dest::open(&rec.spec.dest, false)
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        let manifest: JobManifest = dest
            .get_json(&dest.job_manifest_path(&job))
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "job {job} has no manifest in {} (was the export removed?)",
                    dest.url
                ))
            })?;
        let schema = match &rec.plan {
            Some(p) => Arc::new(haul_shared::jobs::export_schema(
                &p.table,
                rec.spec.output.lineage,
            )),
            None => Arc::new(Schema::empty()),
        };
        Ok((rec, schema, manifest, dest))
    }

    fn info(job: &str, schema: &Schema, m: &JobManifest) -> Result<FlightInfo, Status> {
        FlightInfo::new()
            .try_with_schema(schema)
            .map_err(|e| Status::internal(e.to_string()))
            .map(|i| {
                i.with_descriptor(FlightDescriptor::new_path(vec![job.to_owned()]))
                    .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(job.to_owned())))
                    .with_total_records(m.rows as i64)
                    .with_total_bytes(m.bytes as i64)
            })
    }
}

/// The job id a descriptor names: its one path element, or its command.
fn descriptor_job(d: &FlightDescriptor) -> Result<String, Status> {
    match (d.path.as_slice(), d.cmd.is_empty()) {
        ([job], _) => Ok(job.clone()),
        ([], false) => String::from_utf8(d.cmd.to_vec())
            .map_err(|_| Status::invalid_argument("the descriptor's command is not a job id")),
        _ => Err(Status::invalid_argument(
            "name the job: a descriptor with path [job id]",
        )),
    }
}

#[tonic::async_trait]
impl FlightService for JobsFlight {
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
        let ids = self
            .jobs
            .list_jobs()
            .await
            .map_err(|e| Status::unavailable(format!("job store: {e}")))?;
        let mut infos = Vec::new();
        for id in ids {
            let id = id.to_string();
            match self.committed(&id).await {
                Ok((_, schema, m, _)) => infos.push(Ok(Self::info(&id, &schema, &m)?)),
                // not succeeded, or its export is gone: not a flight
                Err(s)
                    if matches!(
                        s.code(),
                        tonic::Code::FailedPrecondition | tonic::Code::NotFound
                    ) => {}
                Err(s) => return Err(s),
            }
        }
        Ok(Response::new(Box::pin(futures::stream::iter(infos))))
    }

    async fn get_flight_info(
        &self,
        req: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let job = descriptor_job(req.get_ref())?;
        let (_, schema, m, _) = self.committed(&job).await?;
        Ok(Response::new(Self::info(&job, &schema, &m)?))
    }

    async fn poll_flight_info(
        &self,
        _: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        Err(Status::unimplemented("use GetFlightInfo"))
    }

    async fn get_schema(
        &self,
        req: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        let job = descriptor_job(req.get_ref())?;
        let (_, schema, _, _) = self.committed(&job).await?;
        let opts = arrow_ipc::writer::IpcWriteOptions::default();
        let r: SchemaResult = SchemaAsIpc::new(&schema, &opts)
            .try_into()
            .map_err(|e: arrow_schema::ArrowError| Status::internal(e.to_string()))?;
        Ok(Response::new(r))
    }

    async fn do_get(&self, req: Request<Ticket>) -> Result<Response<Self::DoGetStream>, Status> {
        let job = String::from_utf8(req.into_inner().ticket.to_vec())
            .map_err(|_| Status::invalid_argument("the ticket is not a job id"))?;
        let (_, schema, m, dest) = self.committed(&job).await?;
        let store = Arc::clone(&dest.store);
        let target = Arc::clone(&schema);
        let batches = futures::stream::iter(m.files.clone())
            .then(move |f| {
                let reader = PartReader::new(Arc::clone(&store), dest.path(&f.path), f.bytes);
                async move {
                    let builder = ParquetRecordBatchStreamBuilder::new(reader)
                        .await
                        .map_err(|e| FlightError::ExternalError(Box::new(e)))?;
                    builder
                        .with_batch_size(READ_BATCH_ROWS)
                        .build()
                        .map_err(|e| FlightError::ExternalError(Box::new(e)))
                }
            })
            .map_ok(|s| s.map_err(|e| FlightError::ExternalError(Box::new(e))))
            .try_flatten()
            .and_then(move |b: RecordBatch| {
                // the files carry the job's schema; restate it so every batch matches it
                let target = Arc::clone(&target);
                async move {
                    RecordBatch::try_new(target, b.columns().to_vec()).map_err(FlightError::Arrow)
                }
            });
        let data = FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .build(batches)
            .map_err(|e| match e {
                FlightError::Tonic(s) => *s,
                other => Status::internal(other.to_string()),
            });
        Ok(Response::new(Box::pin(data)))
    }

    async fn do_put(
        &self,
        _: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        Err(Status::unimplemented(
            "the coordinator does not load; stream to `haul loader`",
        ))
    }

    async fn do_exchange(
        &self,
        _: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        Err(Status::unimplemented("do_exchange"))
    }

    async fn do_action(
        &self,
        _: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        Err(Status::unimplemented("no actions"))
    }

    async fn list_actions(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        Ok(Response::new(Box::pin(futures::stream::empty())))
    }
}
