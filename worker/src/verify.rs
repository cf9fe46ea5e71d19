//! `haul verify`: reconciles a committed export with its source, chunk by chunk. For
//! every chunk of the job's plan, Postgres counts the chunk's rows and sums a hash of
//! each (order-independent), and the same count and sum are computed from the chunk's
//! Parquet parts read back; any difference names the chunk and its range.
//!
//! Both sides hash the same bytes for a row: for each exported column, `n` for NULL,
//! else the value's length (4 bytes) and its canonical bytes — the value's binary form as
//! Postgres sends it (`int8send`, `float8send`, `timestamp_send`, `interval_send`,
//! `uuid_send`...) for fixed-size types, the text for text-like types, the bytes of
//! bytea, `trim_scale(numeric)` as text, and for arrays the count then each element so.
//! Postgres computes them in SQL (never through haul's decoder); here they are rebuilt
//! from the Arrow values read back. A row's hash is the first 8 bytes of the MD5 of its
//! bytes, summed exactly.
//!
//! The source side reads in one snapshot (exported, shared by the sessions verifying
//! chunks in parallel), so a static source gives an exact answer; a source written since
//! the job differs by what was written.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Date32Type, Decimal128Type, Decimal256Type, Float32Type, Float64Type, Int16Type, Int32Type,
    Int64Type, Time64MicrosecondType, TimestampMicrosecondType,
};
use arrow_array::{Array, ArrayRef, RecordBatch};
use futures::TryStreamExt;
use haul_shared::JobId;
use haul_shared::error::{Classify, ErrorClass};
use haul_shared::jobs::JobPlan;
use haul_shared::lake::reader::PartReader;
use haul_shared::lake::{ChunkManifest, Dest, DestError, JobManifest, PlanFile};
use haul_shared::pg::{
    self, DATE_INFINITY, DATE_NEG_INFINITY, PG_EPOCH_OFFSET_DAYS, PG_EPOCH_OFFSET_US, PgKind,
    SourceError, TS_INFINITY, TS_NEG_INFINITY, quote_literal,
};
use md5::{Digest, Md5};
use parquet::arrow::ProjectionMask;
use parquet::arrow::async_reader::ParquetRecordBatchStreamBuilder;
use serde::Serialize;

use crate::executor::chunk_filter;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Dest(#[from] DestError),
    #[error(
        "{table_dir} in {dest} has no committed export to verify (`haul ls {dest}` lists what the lake holds)"
    )]
    NothingCommitted { dest: String, table_dir: String },
    #[error("job {job} is not committed in {dest} (`haul show {dest}/{table_dir}` lists its jobs)")]
    NoSuchJob {
        job: JobId,
        dest: String,
        table_dir: String,
    },
    #[error(
        "job {job}'s plan ({what}) is missing from {dest}: its records were removed, so there is nothing to verify chunk by chunk"
    )]
    RecordsMissing {
        job: JobId,
        dest: String,
        what: &'static str,
    },
    #[error("job {job} loaded into Postgres only; it wrote no Parquet to verify")]
    NoParquet { job: JobId },
    #[error(
        "column {column} ({pg_type}) is held verbatim in Postgres's array form, which verify does not read back"
    )]
    Unsupported { column: String, pg_type: String },
    #[error("reading {path}: {reason}")]
    Parquet { path: String, reason: String },
    /// A task of the verification stopped (the process is ending) or failed inside.
    #[error("a verification task stopped: {0}")]
    Task(String),
    #[error(
        "{path}: column {column} is {found} in the file, not {expected} as the job exported it"
    )]
    WrongType {
        path: String,
        column: String,
        found: String,
        expected: String,
    },
}

impl Classify for VerifyError {
    fn class(&self) -> ErrorClass {
        match self {
            VerifyError::Source(e) => e.class(),
            VerifyError::Dest(e) => e.class(),
            VerifyError::Parquet { .. } => ErrorClass::Transient,
            VerifyError::Task(_) => ErrorClass::Internal,
            _ => ErrorClass::User,
        }
    }
}

/// What to verify: a table's folder in a lake (its committed export, or one job of it).
pub struct VerifyRequest {
    pub dest: Dest,
    pub table_dir: String,
    /// A job of the export (an increment of a series); its last job otherwise.
    pub job: Option<JobId>,
    pub source: pg::Database,
    /// Chunks verified at once (each a source session and a Parquet reader).
    pub parallelism: usize,
}

/// One chunk compared.
#[derive(Clone, Debug, Serialize)]
pub struct ChunkCheck {
    pub chunk: u32,
    /// The chunk's rows, as its query's `WHERE`.
    pub range: String,
    pub source_rows: u64,
    pub export_rows: u64,
    pub source_checksum: String,
    pub export_checksum: String,
    pub identical: bool,
    /// Why the export side could not be read (a part missing or unreadable), if so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// The outcome of a verification.
#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    pub job_id: String,
    pub table: String,
    pub source_rows: u64,
    pub export_rows: u64,
    /// Every chunk matched.
    pub identical: bool,
    /// Every chunk compared, in chunk order.
    pub chunks: Vec<ChunkCheck>,
    pub chunks_checked: usize,
    pub columns: Vec<String>,
}

/// Compares the export's chunks with the source; see the module docs.
pub async fn verify(req: VerifyRequest) -> Result<VerifyReport, VerifyError> {
    let dest = &req.dest;
    let current = haul_shared::lake::table::current(dest, &req.table_dir).await?;
    let Some((now, table)) = current else {
        return Err(VerifyError::NothingCommitted {
            dest: dest.url.clone(),
            table_dir: req.table_dir.clone(),
        });
    };
    let job = match &req.job {
        None => table.job.clone(),
        Some(j) if *j == table.job => j.clone(),
        Some(j) => {
            let held = match dest
                .get_json::<JobManifest>(&dest.job_manifest_path(j))
                .await?
            {
                Some(m) => haul_shared::lake::table::holds(&now, &m),
                None => false,
            };
            if !held {
                return Err(VerifyError::NoSuchJob {
                    job: j.clone(),
                    dest: dest.url.clone(),
                    table_dir: req.table_dir.clone(),
                });
            }
            j.clone()
        }
    };
    let missing = |what| VerifyError::RecordsMissing {
        job: job.clone(),
        dest: dest.url.clone(),
        what,
    };
    let plan_file: PlanFile = dest
        .get_json(&dest.plan_path(&job))
        .await?
        .ok_or_else(|| missing("plan.json"))?;
    if !plan_file.output.parquet {
        return Err(VerifyError::NoParquet { job });
    }
    let plan = Arc::new(plan_file.plan);
    for c in &plan.table.columns {
        if matches!(c.kind, PgKind::ArrayBinary { .. }) {
            return Err(VerifyError::Unsupported {
                column: c.name.clone(),
                pg_type: c.pg_type.clone(),
            });
        }
    }
    let manifests = dest.chunk_manifests(&job).await?;
    if manifests.len() != plan.chunks.len() {
        return Err(missing("some chunk manifests"));
    }
    let manifests = Arc::new(manifests);

    // one snapshot for every session: exported by the first, imported by the others
    let holder = pg::connect(&req.source).await?;
    holder
        .client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(|e| SourceError::query("beginning the verification snapshot", e))?;
    let snapshot: String = holder
        .client
        .query_one("SELECT pg_export_snapshot()", &[])
        .await
        .map_err(|e| SourceError::query("exporting the verification snapshot", e))?
        .get(0);
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..req.parallelism.clamp(1, manifests.len().max(1)) {
        let (plan, manifests, next) =
            (Arc::clone(&plan), Arc::clone(&manifests), Arc::clone(&next));
        let (dest, db, snapshot) = (req.dest.clone(), req.source.clone(), snapshot.clone());
        tasks.spawn(async move {
            let session = pg::connect(&db).await?;
            session
                .client
                .batch_execute(&format!(
                    "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
                    quote_literal(&snapshot)
                ))
                .await
                .map_err(|e| SourceError::query("importing the verification snapshot", e))?;
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(m) = manifests.get(i) else {
                    break;
                };
                let (source, export) = tokio::join!(
                    source_side(&session.client, &plan, m),
                    export_side(&dest, &plan, m)
                );
                let source = source?;
                // a part that cannot be read is this chunk's finding, not the end of the
                // verification
                let (export, problem) = match export {
                    Ok(e) => (e, None),
                    Err(e @ VerifyError::Task(_)) => return Err(e),
                    Err(e) => ((0, String::new()), Some(e.to_string())),
                };
                out.push(ChunkCheck {
                    chunk: m.chunk.0,
                    range: chunk_filter(&plan, &m.range),
                    source_rows: source.0,
                    export_rows: export.0,
                    identical: problem.is_none() && source == export,
                    source_checksum: source.1,
                    export_checksum: export.1,
                    problem,
                });
            }
            Ok::<_, VerifyError>(out)
        });
    }
    let mut checks = Vec::with_capacity(manifests.len());
    while let Some(r) = tasks.join_next().await {
        checks.extend(r.map_err(|e| VerifyError::Task(e.to_string()))??);
    }
    drop(holder);
    checks.sort_by_key(|c| c.chunk);
    let identical = checks.iter().all(|c| c.identical);
    Ok(VerifyReport {
        job_id: job.to_string(),
        table: plan.table.quoted(),
        source_rows: checks.iter().map(|c| c.source_rows).sum(),
        export_rows: checks.iter().map(|c| c.export_rows).sum(),
        identical,
        chunks_checked: checks.len(),
        chunks: checks,
        columns: plan.table.columns.iter().map(|c| c.name.clone()).collect(),
    })
}

/// Rows and checksum of a chunk, computed by Postgres.
async fn source_side(
    client: &tokio_postgres::Client,
    plan: &JobPlan,
    m: &ChunkManifest,
) -> Result<(u64, String), VerifyError> {
    let row_bytes: Vec<String> = plan
        .table
        .columns
        .iter()
        .map(|c| {
            let v = c.select_expr();
            let x = canon_sql(&c.kind, &v);
            format!("CASE WHEN ({v}) IS NULL THEN '\\x6e'::bytea ELSE int4send(octet_length({x})) || {x} END")
        })
        .collect();
    let row = if row_bytes.is_empty() {
        "''::bytea".to_owned()
    } else {
        row_bytes.join(" || ")
    };
    let sql = format!(
        "SELECT count(*)::int8, coalesce(sum(h), 0)::text FROM (SELECT ('x' || substr(md5({row}), 1, 16))::bit(64)::int8 AS h FROM {} WHERE {}) s",
        plan.table.quoted(),
        chunk_filter(plan, &m.range)
    );
    let r = client
        .query_one(&sql, &[])
        .await
        .map_err(|e| SourceError::query(format!("checksumming chunk {}", m.chunk), e))?;
    Ok((r.get::<_, i64>(0) as u64, r.get(1)))
}

/// The canonical bytes of a value `v` of `kind`, in SQL (see the module docs).
fn canon_sql(kind: &PgKind, v: &str) -> String {
    match kind {
        PgKind::Bool => format!("boolsend({v})"),
        PgKind::Int2 => format!("int2send({v})"),
        PgKind::Int4 => format!("int4send({v})"),
        PgKind::Int8 => format!("int8send({v})"),
        PgKind::Oid => format!("oidsend({v})"),
        PgKind::Float4 => format!("float4send({v})"),
        PgKind::Float8 => format!("float8send({v})"),
        PgKind::Numeric { .. } => format!("convert_to(trim_scale({v})::text, 'UTF8')"),
        PgKind::Text | PgKind::Jsonb => format!("convert_to(concat({v}), 'UTF8')"),
        PgKind::Bytea => format!("({v})::bytea"),
        PgKind::Date => format!("date_send({v})"),
        PgKind::Time => format!("time_send({v})"),
        PgKind::Timestamp => format!("timestamp_send({v})"),
        PgKind::Timestamptz => format!("timestamptz_send({v})"),
        PgKind::Interval => format!("interval_send({v})"),
        PgKind::Uuid => format!("uuid_send({v})"),
        PgKind::Array { element } | PgKind::ArrayBinary { element } => {
            let x = canon_sql(element, "e");
            format!(
                "int4send(coalesce(cardinality({v}), 0)) || coalesce((SELECT string_agg(CASE WHEN e IS NULL THEN '\\x6e'::bytea ELSE int4send(octet_length({x})) || {x} END, ''::bytea ORDER BY o) FROM unnest({v}) WITH ORDINALITY AS u(e, o)), ''::bytea)"
            )
        }
    }
}

/// Rows and checksum of a chunk, from its Parquet parts read back.
async fn export_side(
    dest: &Dest,
    plan: &Arc<JobPlan>,
    m: &ChunkManifest,
) -> Result<(u64, String), VerifyError> {
    let (mut rows, mut sum) = (0u64, 0i128);
    for f in &m.files {
        let path = dest.path(&f.path);
        let perr = |e: parquet::errors::ParquetError| VerifyError::Parquet {
            path: f.path.clone(),
            reason: e.to_string(),
        };
        // the part as it is now (a part rewritten since has another size than the
        // manifest's, and read at the old size its footer would look corrupt)
        let size = match object_store::ObjectStoreExt::head(dest.store.as_ref(), &path).await {
            Ok(meta) => meta.size,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(VerifyError::Parquet {
                    path: f.path.clone(),
                    reason: "the part is missing (deleted since the job committed it?)".into(),
                });
            }
            Err(e) => {
                return Err(VerifyError::Parquet {
                    path: f.path.clone(),
                    reason: e.to_string(),
                });
            }
        };
        let reader = PartReader::new(Arc::clone(&dest.store), path.clone(), size);
        let builder = ParquetRecordBatchStreamBuilder::new(reader)
            .await
            .map_err(perr)?;
        // the exported columns, by name (lineage columns and the like are not the source's)
        let mut roots = Vec::with_capacity(plan.table.columns.len());
        for c in &plan.table.columns {
            let i = builder
                .schema()
                .index_of(&c.name)
                .map_err(|_| VerifyError::Parquet {
                    path: f.path.clone(),
                    reason: format!("column {} is missing", c.name),
                })?;
            roots.push(i);
        }
        let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
        let mut stream = builder
            .with_projection(mask)
            .with_batch_size(8192)
            .build()
            .map_err(perr)?;
        while let Some(batch) = stream.try_next().await.map_err(perr)? {
            // hashing is CPU work: off the async runtime
            let (p, plan) = (f.path.clone(), Arc::clone(plan));
            let (n, s) = tokio::task::spawn_blocking(move || hash_batch(&p, &plan, &batch))
                .await
                .map_err(|e| VerifyError::Task(format!("hashing a batch: {e}")))??;
            rows += n;
            sum += s;
        }
    }
    Ok((rows, sum.to_string()))
}

/// Rows of a batch and the sum of their hashes.
fn hash_batch(path: &str, plan: &JobPlan, batch: &RecordBatch) -> Result<(u64, i128), VerifyError> {
    let mut cols: Vec<(&ArrayRef, &PgKind, &str)> = Vec::with_capacity(plan.table.columns.len());
    for c in &plan.table.columns {
        let a = batch
            .column_by_name(&c.name)
            .ok_or_else(|| VerifyError::Parquet {
                path: path.to_owned(),
                reason: format!("column {} is missing", c.name),
            })?;
        let expected = c.kind.arrow_type();
        if a.data_type() != &expected {
            return Err(VerifyError::WrongType {
                path: path.to_owned(),
                column: c.name.clone(),
                found: a.data_type().to_string(),
                expected: expected.to_string(),
            });
        }
        cols.push((a, &c.kind, &c.name));
    }
    let (mut sum, mut buf, mut val) = (0i128, Vec::new(), Vec::new());
    for row in 0..batch.num_rows() {
        buf.clear();
        for (a, kind, _) in &cols {
            put_value(&mut buf, &mut val, a.as_ref(), kind, row);
        }
        let digest = Md5::digest(&buf);
        let h = i64::from_be_bytes(digest[..8].try_into().expect("an MD5 has 16 bytes"));
        sum += i128::from(h);
    }
    Ok((batch.num_rows() as u64, sum))
}

/// Appends `n` for a NULL, else the value's length (4 bytes, big-endian) and its
/// canonical bytes. `val` is scratch space.
fn put_value(out: &mut Vec<u8>, val: &mut Vec<u8>, a: &dyn Array, kind: &PgKind, i: usize) {
    if a.is_null(i) {
        out.push(b'n');
        return;
    }
    val.clear();
    canon(val, a, kind, i);
    out.extend_from_slice(&(val.len() as i32).to_be_bytes());
    out.extend_from_slice(val);
}

/// A value's canonical bytes, as [`canon_sql`] makes them in Postgres. The array's type
/// was checked against `kind`'s.
fn canon(out: &mut Vec<u8>, a: &dyn Array, kind: &PgKind, i: usize) {
    match kind {
        PgKind::Bool => out.push(u8::from(a.as_boolean().value(i))),
        PgKind::Int2 => out.extend(a.as_primitive::<Int16Type>().value(i).to_be_bytes()),
        PgKind::Int4 => out.extend(a.as_primitive::<Int32Type>().value(i).to_be_bytes()),
        PgKind::Int8 => out.extend(a.as_primitive::<Int64Type>().value(i).to_be_bytes()),
        PgKind::Oid => out.extend((a.as_primitive::<Int64Type>().value(i) as u32).to_be_bytes()),
        PgKind::Float4 => out.extend(
            a.as_primitive::<Float32Type>()
                .value(i)
                .to_bits()
                .to_be_bytes(),
        ),
        PgKind::Float8 => out.extend(
            a.as_primitive::<Float64Type>()
                .value(i)
                .to_bits()
                .to_be_bytes(),
        ),
        PgKind::Numeric { .. } => {
            let s = match a.data_type() {
                arrow_schema::DataType::Decimal128(..) => {
                    a.as_primitive::<Decimal128Type>().value_as_string(i)
                }
                _ => a.as_primitive::<Decimal256Type>().value_as_string(i),
            };
            out.extend_from_slice(trim_scale(&s).as_bytes());
        }
        PgKind::Text | PgKind::Jsonb => {
            out.extend_from_slice(a.as_string::<i32>().value(i).as_bytes())
        }
        PgKind::Bytea | PgKind::ArrayBinary { .. } => {
            out.extend_from_slice(a.as_binary::<i32>().value(i))
        }
        PgKind::Date => {
            let d = match a.as_primitive::<Date32Type>().value(i) {
                DATE_INFINITY => i32::MAX,
                DATE_NEG_INFINITY => i32::MIN,
                d => d - PG_EPOCH_OFFSET_DAYS,
            };
            out.extend(d.to_be_bytes());
        }
        PgKind::Time => out.extend(
            a.as_primitive::<Time64MicrosecondType>()
                .value(i)
                .to_be_bytes(),
        ),
        PgKind::Timestamp | PgKind::Timestamptz => {
            let t = match a.as_primitive::<TimestampMicrosecondType>().value(i) {
                TS_INFINITY => i64::MAX,
                TS_NEG_INFINITY => i64::MIN,
                t => t - PG_EPOCH_OFFSET_US,
            };
            out.extend(t.to_be_bytes());
        }
        PgKind::Interval => {
            let s = a.as_struct();
            let months = s.column(0).as_primitive::<Int32Type>().value(i);
            let days = s.column(1).as_primitive::<Int32Type>().value(i);
            let micros = s.column(2).as_primitive::<Int64Type>().value(i);
            out.extend(micros.to_be_bytes());
            out.extend(days.to_be_bytes());
            out.extend(months.to_be_bytes());
        }
        PgKind::Uuid => out.extend_from_slice(a.as_fixed_size_binary().value(i)),
        PgKind::Array { element } => {
            let list = a.as_list::<i32>();
            let values = list.value(i);
            out.extend((values.len() as i32).to_be_bytes());
            let mut scratch = Vec::new();
            for j in 0..values.len() {
                put_value(out, &mut scratch, values.as_ref(), element, j);
            }
        }
    }
}

/// A decimal's text as Postgres's `trim_scale` leaves it: no trailing zeros after the
/// point, and no point without digits after it.
fn trim_scale(s: &str) -> &str {
    if !s.contains('.') {
        return s;
    }
    s.trim_end_matches('0').trim_end_matches('.')
}

#[cfg(test)]
mod tests {
    #[test]
    fn trim_scale_is_postgres_s() {
        assert_eq!(super::trim_scale("12.3400"), "12.34");
        assert_eq!(super::trim_scale("0.000"), "0");
        assert_eq!(super::trim_scale("-0.05"), "-0.05");
        assert_eq!(super::trim_scale("1200"), "1200");
        assert_eq!(super::trim_scale("100.0"), "100");
    }
}
