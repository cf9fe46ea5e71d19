//! The worker's side of loading: streams a chunk's batches to a loader with Flight DoPut
//! while the chunk is read, and waits for the loader's acknowledgement of its commit.
//!
//! - The batches are the ones the Parquet writer gets (no second read); at most
//!   [`IN_FLIGHT_BATCHES`] wait to be sent, so a slow loader slows the reader down and
//!   the worker's memory stays flat.
//! - Loaders are chosen per chunk: chunk and epoch pick the first endpoint tried, so
//!   chunks spread across loaders and a redelivered chunk goes to another one; an
//!   endpoint that does not answer is skipped for the next.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Classify, ErrorClass};
use crate::jobs::LoadSpec;
use crate::pg::Secret;
use crate::proto::wire::{ChunkEnd, LoadAck, LoadChunk, PrepareLoad, PrepareLoadReply};
use crate::rpc::{ClientOptions, error_chain};
use arrow_array::RecordBatch;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::{Action, FlightClient, FlightData, FlightDescriptor};
use arrow_schema::SchemaRef;
use futures::StreamExt;
use prost::Message;
use tokio::sync::mpsc;
use tonic::Code;

use super::PREPARE_ACTION;

/// Batches queued for a loader before the reader waits.
pub const IN_FLIGHT_BATCHES: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum LoadClientError {
    #[error("bad loader address {url:?}: {reason}")]
    BadAddress { url: String, reason: String },
    #[error("no loader answered ({tried}); is `haul loader` running there?")]
    Unreachable { tried: String },
    #[error("loader {endpoint}: {message}")]
    Refused {
        endpoint: String,
        code: Code,
        message: String,
    },
    #[error("loader {endpoint} answered without an acknowledgement of the chunk")]
    NoAck { endpoint: String },
    #[error("loader {endpoint} acknowledged {got}, not {want}")]
    WrongAck {
        endpoint: String,
        got: String,
        want: String,
    },
}

impl Classify for LoadClientError {
    fn class(&self) -> ErrorClass {
        match self {
            LoadClientError::BadAddress { .. } => ErrorClass::User,
            LoadClientError::Refused { code, .. } => match code {
                Code::InvalidArgument
                | Code::FailedPrecondition
                | Code::NotFound
                | Code::PermissionDenied
                | Code::Unauthenticated
                | Code::Unimplemented => ErrorClass::User,
                _ => ErrorClass::Transient,
            },
            LoadClientError::WrongAck { .. } => ErrorClass::Internal,
            LoadClientError::Unreachable { .. } | LoadClientError::NoAck { .. } => {
                ErrorClass::Transient
            }
        }
    }
}

/// How a worker authenticates to loaders: the cluster's token and CA.
#[derive(Clone, Debug, Default)]
pub struct LoadAuth {
    pub token: Option<Secret>,
    pub tls_ca: Option<PathBuf>,
}

/// Talks to a job's loaders.
#[derive(Clone, Debug)]
pub struct LoadClient {
    endpoints: Vec<String>,
    token: Option<Secret>,
    tls_ca: Option<PathBuf>,
}

impl LoadClient {
    pub fn new(spec: &LoadSpec, auth: &LoadAuth) -> Self {
        Self {
            endpoints: spec.endpoints.clone(),
            token: auth.token.clone(),
            tls_ca: auth.tls_ca.clone(),
        }
    }

    /// Connects to the first endpoint that answers, starting at `first` (modulo their
    /// number).
    async fn connect(&self, first: usize) -> Result<(String, FlightClient), LoadClientError> {
        let n = self.endpoints.len();
        let mut tried = Vec::new();
        for i in 0..n {
            let url = &self.endpoints[(first + i) % n];
            if self.token.is_some() && url.starts_with("http://") {
                // the bearer token would travel in clear to whatever listens there
                return Err(LoadClientError::BadAddress {
                    url: crate::rpc::flight_display(url),
                    reason: "the cluster's token would be sent to it in clear: with a token set, loaders are reached over TLS (flight+tls:// or https://, with --loader-tls-ca for a private CA)".into(),
                });
            }
            let opts = ClientOptions {
                url: url.clone(),
                token: self.token.clone(),
                tls_ca: self.tls_ca.clone(),
            };
            let ep = opts
                .endpoint()
                .map_err(|e| LoadClientError::BadAddress {
                    url: url.clone(),
                    reason: e.to_string(),
                })?
                .connect_timeout(Duration::from_secs(3))
                .initial_stream_window_size(Some(4 << 20))
                .initial_connection_window_size(Some(8 << 20));
            match ep.connect().await {
                Ok(ch) => {
                    let mut client = FlightClient::new(ch);
                    if let Some(t) = &self.token {
                        client
                            .add_header("authorization", &format!("Bearer {}", t.expose()))
                            .map_err(|e| LoadClientError::BadAddress {
                                url: url.clone(),
                                reason: format!("the token is not a valid header: {e}"),
                            })?;
                    }
                    return Ok((url.clone(), client));
                }
                Err(e) => {
                    let shown = crate::rpc::flight_display(url);
                    tracing::warn!(loader = %shown, error = %error_chain(&e), "loader unreachable; trying the next");
                    tried.push(format!("{shown}: {}", error_chain(&e)));
                }
            }
        }
        Err(LoadClientError::Unreachable {
            tried: tried.join("; "),
        })
    }

    /// Prepares the job on the target (through the first loader that answers).
    pub async fn prepare(&self, req: PrepareLoad) -> Result<PrepareLoadReply, LoadClientError> {
        let (endpoint, mut client) = self.connect(0).await?;
        let refused = |e: FlightError| refused(&endpoint, e);
        let mut results = client
            .do_action(Action::new(PREPARE_ACTION, req.encode_to_vec()))
            .await
            .map_err(refused)?;
        let body = results
            .next()
            .await
            .ok_or_else(|| LoadClientError::NoAck {
                endpoint: endpoint.clone(),
            })?
            .map_err(refused)?;
        PrepareLoadReply::decode(body).map_err(|e| LoadClientError::WrongAck {
            endpoint: endpoint.clone(),
            got: format!("a malformed reply ({e})"),
            want: "a PrepareLoadReply".into(),
        })
    }

    /// Opens the DoPut of one chunk attempt. Send its batches with [`ChunkLoad::send`],
    /// then wait for the commit with [`ChunkLoad::finish`].
    pub async fn start(
        &self,
        cmd: LoadChunk,
        schema: SchemaRef,
    ) -> Result<ChunkLoad, LoadClientError> {
        let first = (cmd.chunk_id as u64).wrapping_add(cmd.epoch) as usize;
        let (endpoint, mut client) = self.connect(first).await?;
        let (tx, rx) = mpsc::channel::<RecordBatch>(IN_FLIGHT_BATCHES);
        let want = (cmd.job_id.clone(), cmd.chunk_id, cmd.epoch);
        let desc = FlightDescriptor::new_cmd(cmd.encode_to_vec());
        let ep = endpoint.clone();
        let task = tokio::spawn(async move {
            let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let counted = Arc::clone(&sent);
            let batches = futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|b| (Ok(b), rx))
            })
            .inspect(move |b: &Result<RecordBatch, FlightError>| {
                if let Ok(b) = b {
                    counted.fetch_add(b.num_rows() as u64, std::sync::atomic::Ordering::Relaxed);
                }
            });
            let end_schema = Arc::clone(&schema);
            // after the last batch: the end of the chunk, with the rows sent (evaluated
            // only once the batches are done)
            let end = futures::stream::once(async move {
                chunk_end(&end_schema, sent.load(std::sync::atomic::Ordering::Relaxed))
            });
            let data = FlightDataEncoderBuilder::new()
                .with_schema(schema)
                .with_flight_descriptor(Some(desc))
                .build(batches)
                .chain(end);
            let mut results = client.do_put(data).await.map_err(|e| refused(&ep, e))?;
            let put = results
                .next()
                .await
                .ok_or_else(|| LoadClientError::NoAck {
                    endpoint: ep.clone(),
                })?
                .map_err(|e| refused(&ep, e))?;
            let ack = LoadAck::decode(put.app_metadata).map_err(|e| LoadClientError::WrongAck {
                endpoint: ep.clone(),
                got: format!("a malformed ack ({e})"),
                want: "a LoadAck".into(),
            })?;
            if (ack.job_id.clone(), ack.chunk_id, ack.epoch) != want {
                return Err(LoadClientError::WrongAck {
                    endpoint: ep.clone(),
                    got: format!("{}/{}@{}", ack.job_id, ack.chunk_id, ack.epoch),
                    want: format!("{}/{}@{}", want.0, want.1, want.2),
                });
            }
            Ok(ack)
        });
        Ok(ChunkLoad {
            endpoint,
            tx: Some(tx),
            task,
        })
    }
}

/// The last message of a chunk's DoPut: an empty batch whose app_metadata is the
/// [`ChunkEnd`] with the rows sent.
fn chunk_end(schema: &SchemaRef, rows: u64) -> Result<FlightData, FlightError> {
    let empty = RecordBatch::new_empty(Arc::clone(schema));
    let mut data = arrow_flight::utils::batches_to_flight_data(schema, [&empty])?;
    let mut last = data
        .pop()
        .ok_or_else(|| FlightError::ProtocolError("no message for an empty batch".into()))?;
    last.app_metadata = ChunkEnd { rows }.encode_to_vec().into();
    Ok(last)
}

fn refused(endpoint: &str, e: FlightError) -> LoadClientError {
    let (code, message) = match e {
        FlightError::Tonic(s) => (s.code(), s.message().to_owned()),
        other => (Code::Unknown, other.to_string()),
    };
    LoadClientError::Refused {
        endpoint: endpoint.to_owned(),
        code,
        message,
    }
}

/// One chunk attempt's stream to a loader.
pub struct ChunkLoad {
    pub endpoint: String,
    tx: Option<mpsc::Sender<RecordBatch>>,
    task: tokio::task::JoinHandle<Result<LoadAck, LoadClientError>>,
}

impl ChunkLoad {
    /// Queues a batch; waits while [`IN_FLIGHT_BATCHES`] are queued already.
    pub async fn send(&mut self, batch: RecordBatch) -> Result<(), LoadClientError> {
        let sent = match &self.tx {
            Some(tx) => tx.send(batch).await.is_ok(),
            None => false,
        };
        if sent {
            return Ok(());
        }
        // the call ended early: its error says why
        self.tx = None;
        match (&mut self.task).await {
            Ok(Err(e)) => Err(e),
            _ => Err(LoadClientError::NoAck {
                endpoint: self.endpoint.clone(),
            }),
        }
    }

    /// Ends the stream: the loader commits once it has taken the batches sent.
    pub fn close(&mut self) {
        self.tx = None;
    }

    /// Ends the stream and waits for the loader's commit.
    pub async fn finish(mut self) -> Result<LoadAck, LoadClientError> {
        self.tx = None;
        match (&mut self.task).await {
            Ok(r) => r,
            Err(_) => Err(LoadClientError::NoAck {
                endpoint: self.endpoint.clone(),
            }),
        }
    }
}

impl Drop for ChunkLoad {
    /// An attempt that stops early resets the stream: the loader rolls back.
    fn drop(&mut self) {
        self.task.abort();
    }
}
