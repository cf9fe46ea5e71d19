//! Parquet writing for one chunk attempt, off the async runtime.
//!
//! Batches go through a bounded channel to one blocking-pool thread that owns the
//! chunk's Parquet writers (encoding and compression are CPU work). It keeps at most
//! [`MAX_OPEN_FILES`] part files open (least recently used closed first), flushes the
//! largest row group when encoded data passes [`BUFFER_BUDGET`], and rotates files at the
//! row/byte limits. Bytes stream to the object store as they are produced.
//!
//! A partitioned export groups each batch's rows by partition and holds them back per
//! partition: a partition's rows are written once they fill a row group, when held rows
//! pass [`PENDING_BUDGET`] (the largest partition's first), and at the chunk's end (in
//! partition order). So rows in any order — a key that says nothing of the partition
//! column's day — make about one file per partition per chunk, not one per row. Memory
//! is bounded by those budgets, never by chunk or table size.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;

use arrow_array::{Array, RecordBatch, cast::AsArray, types::*};
use arrow_schema::{DataType, SchemaRef};
use haul_shared::jobs::{Compression, Granularity, OutputOptions};
use object_store::buffered::BufWriter;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression as PqCompression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;
use tokio::io::AsyncWriteExt;
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use haul_shared::lake::{Dest, PartFile};
use haul_shared::pg::{DATE_INFINITY, DATE_NEG_INFINITY, TS_INFINITY, TS_NEG_INFINITY};

/// Part files open at once per chunk (each holds a row group in memory).
pub const MAX_OPEN_FILES: usize = 16;
/// Encoded-but-unflushed bytes across a chunk's open files before a row group is cut.
pub const BUFFER_BUDGET: usize = 96 * 1024 * 1024;
/// Rows held back for their partitions (Arrow's in-memory size) before the largest
/// partition's are written.
pub const PENDING_BUDGET: usize = 64 * 1024 * 1024;
/// Bytes gathered before one write to the object store.
const SINK_BUFFER: usize = 1024 * 1024;
/// Multipart upload part size (S3's minimum); two parts in flight per file.
const UPLOAD_PART: usize = 5 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("writing {path}: {reason}")]
    Io { path: String, reason: String },
    #[error(
        "partition column {column:?} has type {data_type}; --partition-by needs a date or timestamp column"
    )]
    BadPartitionColumn { column: String, data_type: String },
    #[error("parquet writer task failed: {0}")]
    Task(String),
    #[error(
        "column {column:?} holds the time 24:00:00, which Parquet's TIME cannot hold (its day ends at 23:59:59.999999); export the column as text with --cast {column}=text"
    )]
    TimeOutOfRange { column: String },
}

/// What the writer needs to know about where its files go.
#[derive(Clone, Debug)]
pub struct WriterConfig {
    pub output: OutputOptions,
    /// Folder of the table under the destination root (`orders`).
    pub table_dir: String,
    /// Staging prefix of this attempt (`_haul/staging/<job>/<chunk>/<epoch>`).
    pub staging: String,
    /// File name stem (`part-<job>-<chunk>`); files are `<stem>-<n>.parquet`.
    pub stem: String,
}

/// The async side of a chunk's writer.
pub struct ChunkWriter {
    tx: mpsc::Sender<RecordBatch>,
    join: JoinHandle<Result<Vec<PartFile>, WriteError>>,
}

impl ChunkWriter {
    pub fn start(dest: Dest, cfg: WriterConfig, schema: SchemaRef) -> Result<Self, WriteError> {
        let partition = match &cfg.output.partition_by {
            None => None,
            Some(p) => {
                let idx =
                    schema
                        .index_of(&p.column)
                        .map_err(|_| WriteError::BadPartitionColumn {
                            column: p.column.clone(),
                            data_type: "missing from the extracted columns".into(),
                        })?;
                let dt = schema.field(idx).data_type();
                if !matches!(dt, DataType::Date32 | DataType::Timestamp(..)) {
                    return Err(WriteError::BadPartitionColumn {
                        column: p.column.clone(),
                        data_type: dt.to_string(),
                    });
                }
                Some((idx, p.granularity, p.field.clone()))
            }
        };
        let (tx, rx) = mpsc::channel(2);
        let handle = Handle::current();
        let join = tokio::task::spawn_blocking(move || {
            let mut w = Writers {
                handle,
                dest,
                cfg,
                schema,
                partition,
                props: None,
                open: Vec::new(),
                done: Vec::new(),
                next_n: 0,
                pending: std::collections::BTreeMap::new(),
                pending_bytes: 0,
            };
            w.run(rx)
        });
        Ok(Self { tx, join })
    }

    /// Hands a batch to the writer thread, waiting while it is busy (backpressure).
    pub async fn write(&self, batch: RecordBatch) -> Result<(), WriteError> {
        if self.tx.send(batch).await.is_err() {
            // the thread stopped early: its error is reported by `finish`
            return Err(WriteError::Task("writer stopped".into()));
        }
        Ok(())
    }

    /// Closes every file and returns the staged parts.
    /// Stops the writer and waits for its thread, whatever it had in hand, so that no
    /// file of this attempt is written after this returns (the caller then removes them).
    pub async fn abort(self) {
        drop(self.tx);
        let _ = self.join.await;
    }

    pub async fn finish(self) -> Result<Vec<PartFile>, WriteError> {
        drop(self.tx);
        self.join
            .await
            .map_err(|e| WriteError::Task(e.to_string()))?
    }
}

struct OpenFile {
    partition: String,
    file: PartFile,
    writer: ArrowWriter<StoreSink>,
}

struct Writers {
    handle: Handle,
    dest: Dest,
    cfg: WriterConfig,
    schema: SchemaRef,
    /// The partition column's index, granularity and field name.
    partition: Option<(usize, Granularity, String)>,
    props: Option<WriterProperties>,
    /// Least recently used first.
    open: Vec<OpenFile>,
    done: Vec<PartFile>,
    next_n: u32,
    /// A partitioned export's rows held back, by partition directory.
    pending: std::collections::BTreeMap<String, Pending>,
    /// Their estimated in-memory size.
    pending_bytes: usize,
}

/// Rows of one partition not yet written.
#[derive(Default)]
struct Pending {
    batches: Vec<RecordBatch>,
    rows: usize,
    bytes: usize,
}

impl Writers {
    fn run(&mut self, mut rx: mpsc::Receiver<RecordBatch>) -> Result<Vec<PartFile>, WriteError> {
        while let Some(batch) = rx.blocking_recv() {
            self.check_times(&batch)?;
            if self.props.is_none() {
                self.props = Some(self.properties(&batch));
            }
            if self.partition.is_none() {
                self.write(String::new(), &batch)?;
            } else {
                self.hold(&batch)?;
            }
            self.enforce_budget()?;
        }
        // what is held back, partition by partition: one file each
        while let Some((partition, _)) = self.pending.first_key_value() {
            let partition = partition.clone();
            self.write_pending(&partition)?;
            // (its file is done: close it rather than keep it among the open ones)
            if let Some(pos) = self.open.iter().position(|f| f.partition == partition) {
                let f = self.open.remove(pos);
                self.close(f)?;
            }
        }
        while !self.open.is_empty() {
            let f = self.open.remove(0);
            self.close(f)?;
        }
        Ok(std::mem::take(&mut self.done))
    }

    /// Refuses a `time` of 24:00:00 (Postgres allows it; Parquet's TIME, and readers,
    /// stop a microsecond before), rather than write a value readers reject or wrap.
    fn check_times(&self, batch: &RecordBatch) -> Result<(), WriteError> {
        const DAY_US: i64 = 86_400_000_000;
        for (i, field) in self.schema.fields().iter().enumerate() {
            if let DataType::Time64(_) = field.data_type() {
                let col = batch.column(i).as_primitive::<Time64MicrosecondType>();
                if col.iter().flatten().any(|v| v >= DAY_US) {
                    return Err(WriteError::TimeOutOfRange {
                        column: field.name().clone(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Writer settings; dictionary encoding only for columns that look low-cardinality in
    /// the first batch (dictionary-encoding unique values costs CPU and saves nothing).
    fn properties(&self, first: &RecordBatch) -> WriterProperties {
        let o = &self.cfg.output;
        let compression = match o.compression {
            Compression::Snappy => PqCompression::SNAPPY,
            Compression::Zstd { level } => {
                PqCompression::ZSTD(ZstdLevel::try_new(level).unwrap_or_default())
            }
            Compression::None => PqCompression::UNCOMPRESSED,
        };
        let mut b = WriterProperties::builder()
            .set_compression(compression)
            .set_max_row_group_row_count(Some(o.row_group_rows.max(1)))
            .set_created_by(format!("haul {}", env!("CARGO_PKG_VERSION")));
        for (i, field) in self.schema.fields().iter().enumerate() {
            if let Some(low) = low_cardinality(first.column(i).as_ref()) {
                b = b.set_column_dictionary_enabled(ColumnPath::from(field.name().as_str()), low);
            }
        }
        b.build()
    }

    /// Holds a batch's rows back by partition; writes a partition's rows once they fill a
    /// row group, and the largest partition's while the rows held pass the budget.
    fn hold(&mut self, batch: &RecordBatch) -> Result<(), WriteError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let per_row = batch.get_array_memory_size() / batch.num_rows();
        let full = self.cfg.output.row_group_rows.max(1);
        for (partition, rows) in self.split(batch)? {
            let bytes = per_row * rows.num_rows();
            let p = self.pending.entry(partition.clone()).or_default();
            p.rows += rows.num_rows();
            p.bytes += bytes;
            p.batches.push(rows);
            self.pending_bytes += bytes;
            if p.rows >= full {
                self.write_pending(&partition)?;
            }
        }
        while self.pending_bytes > PENDING_BUDGET {
            let Some(largest) = self
                .pending
                .iter()
                .max_by_key(|(_, p)| p.bytes)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            self.write_pending(&largest)?;
        }
        Ok(())
    }

    /// Writes the rows held back for `partition`.
    fn write_pending(&mut self, partition: &str) -> Result<(), WriteError> {
        let Some(p) = self.pending.remove(partition) else {
            return Ok(());
        };
        self.pending_bytes -= p.bytes;
        for b in &p.batches {
            self.write(partition.to_owned(), b)?;
        }
        Ok(())
    }

    /// A batch's rows grouped by partition directory (in order of first appearance):
    /// zero-copy slices when each partition's rows are contiguous (rows in partition
    /// order), else gathered copies.
    fn split(&self, batch: &RecordBatch) -> Result<Vec<(String, RecordBatch)>, WriteError> {
        let Some((idx, gran, field)) = &self.partition else {
            return Ok(vec![(String::new(), batch.clone())]);
        };
        let col = batch.column(*idx);
        let key_of = |i: usize| -> Option<Day> {
            if col.is_null(i) {
                return None;
            }
            Some(match col.data_type() {
                DataType::Date32 => match col.as_primitive::<Date32Type>().value(i) {
                    DATE_INFINITY => Day::Infinity,
                    DATE_NEG_INFINITY => Day::NegInfinity,
                    d => Day::Finite(d.into()),
                },
                _ => match col.as_primitive::<TimestampMicrosecondType>().value(i) {
                    TS_INFINITY => Day::Infinity,
                    TS_NEG_INFINITY => Day::NegInfinity,
                    t => Day::Finite(t.div_euclid(86_400_000_000)),
                },
            })
        };
        // each row's group: the directory is formatted once per distinct day
        let mut dirs: Vec<String> = Vec::new();
        let mut rows: Vec<Vec<u32>> = Vec::new();
        let mut by_dir: HashMap<String, usize> = HashMap::new();
        let mut by_day: HashMap<Option<Day>, usize> = HashMap::new();
        let (mut contiguous, mut last) = (true, usize::MAX);
        for i in 0..batch.num_rows() {
            let day = key_of(i);
            let g = match by_day.get(&day) {
                Some(g) => *g,
                None => {
                    let dir = partition_dir(day, *gran, field);
                    let g = match by_dir.get(&dir) {
                        Some(g) => *g,
                        None => {
                            by_dir.insert(dir.clone(), dirs.len());
                            dirs.push(dir);
                            rows.push(Vec::new());
                            dirs.len() - 1
                        }
                    };
                    by_day.insert(day, g);
                    g
                }
            };
            if g != last {
                contiguous &= rows[g].is_empty();
                last = g;
            }
            rows[g].push(i as u32);
        }
        if contiguous {
            return Ok(dirs
                .into_iter()
                .zip(rows)
                .map(|(dir, r)| (dir, batch.slice(r[0] as usize, r.len())))
                .collect());
        }
        dirs.into_iter()
            .zip(rows)
            .map(|(dir, r)| {
                let r = arrow_array::UInt32Array::from(r);
                Ok((dir, arrow_select::take::take_record_batch(batch, &r)?))
            })
            .collect::<Result<_, arrow_schema::ArrowError>>()
            .map_err(|e| WriteError::Task(format!("grouping rows by partition: {e}")))
    }

    /// Writes `batch` to its partition's open file, splitting it where a file reaches
    /// `max_file_rows` (files never exceed it) and rotating past `max_file_bytes`.
    fn write(&mut self, partition: String, batch: &RecordBatch) -> Result<(), WriteError> {
        let mut rest = batch.clone();
        while rest.num_rows() > 0 {
            let pos = match self.open.iter().position(|f| f.partition == partition) {
                Some(p) => p,
                None => {
                    if self.open.len() >= MAX_OPEN_FILES {
                        let lru = self.open.remove(0);
                        self.close(lru)?;
                    }
                    let f = self.open_file(partition.clone())?;
                    self.open.push(f);
                    self.open.len() - 1
                }
            };
            let mut f = self.open.remove(pos);
            let o = &self.cfg.output;
            let room = o.max_file_rows.saturating_sub(f.file.rows).max(1) as usize;
            let take = room.min(rest.num_rows());
            let part = rest.slice(0, take);
            rest = rest.slice(take, rest.num_rows() - take);
            f.writer.write(&part)?;
            f.file.rows += take as u64;
            let size = f.writer.bytes_written() + f.writer.in_progress_size();
            if f.file.rows >= o.max_file_rows || size as u64 >= o.max_file_bytes {
                self.close(f)?;
            } else {
                self.open.push(f); // most recently used last
            }
        }
        Ok(())
    }

    fn enforce_budget(&mut self) -> Result<(), WriteError> {
        loop {
            let total: usize = self.open.iter().map(|f| f.writer.in_progress_size()).sum();
            if total <= BUFFER_BUDGET {
                return Ok(());
            }
            let Some(big) = self
                .open
                .iter_mut()
                .max_by_key(|f| f.writer.in_progress_size())
            else {
                return Ok(());
            };
            if big.writer.in_progress_size() == 0 {
                return Ok(());
            }
            big.writer.flush()?;
        }
    }

    fn open_file(&mut self, partition: String) -> Result<OpenFile, WriteError> {
        let n = self.next_n;
        self.next_n += 1;
        let name = format!("{}-{n:04}.parquet", self.cfg.stem);
        let rel_dir = if partition.is_empty() {
            self.cfg.table_dir.clone()
        } else {
            format!("{}/{partition}", self.cfg.table_dir)
        };
        let path = format!("{rel_dir}/{name}");
        let staged = format!("{}/{path}", self.cfg.staging);
        let sink = StoreSink {
            handle: self.handle.clone(),
            inner: BufWriter::with_capacity(
                Arc::clone(&self.dest.store),
                self.dest.path(&staged),
                UPLOAD_PART,
            )
            .with_max_concurrency(2),
            buf: Vec::with_capacity(SINK_BUFFER),
            written: 0,
            path: staged.clone(),
        };
        let props = self
            .props
            .clone()
            .expect("properties set before the first file");
        let writer = ArrowWriter::try_new(sink, Arc::clone(&self.schema), Some(props))?;
        Ok(OpenFile {
            partition: partition.clone(),
            file: PartFile {
                path,
                staged,
                rows: 0,
                bytes: 0,
                partition,
            },
            writer,
        })
    }

    fn close(&mut self, f: OpenFile) -> Result<(), WriteError> {
        let OpenFile {
            mut file, writer, ..
        } = f;
        let sink = writer.into_inner()?;
        file.bytes = sink.finish()?;
        self.done.push(file);
        Ok(())
    }
}

/// The day a partition value falls on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Day {
    /// Days since 1970-01-01.
    Finite(i64),
    Infinity,
    NegInfinity,
}

/// `dt=2024-03-09` (day), `dt=2024-03` (month), `dt=2024` (year), with `field` for `dt`;
/// NULL goes to Hive's default partition; ±infinity to `dt=infinity` / `dt=-infinity`.
/// Every finite day has its own folder, Postgres's whole range included: years past 9999
/// are written `+12345`, years before 1 AD as ISO 8601 counts them (1 BC is `0000`,
/// 2 BC `-0001`).
pub fn partition_dir(day: Option<Day>, gran: Granularity, field: &str) -> String {
    let days = match day {
        None => return format!("{field}=__HIVE_DEFAULT_PARTITION__"),
        Some(Day::Infinity) => return format!("{field}=infinity"),
        Some(Day::NegInfinity) => return format!("{field}=-infinity"),
        Some(Day::Finite(d)) => d,
    };
    let (y, m, d) = civil_from_days(days);
    let year = match y {
        0..=9999 => format!("{y:04}"),
        10_000.. => format!("+{y}"),
        _ => format!("-{:04}", -y),
    };
    match gran {
        Granularity::Day => format!("{field}={year}-{m:02}-{d:02}"),
        Granularity::Month => format!("{field}={year}-{m:02}"),
        Granularity::Year => format!("{field}={year}"),
    }
}

/// The proleptic Gregorian (year, month, day) of a count of days since 1970-01-01, for
/// any count (Howard Hinnant's `civil_from_days`); chrono stops at year 262143.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11]
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Values of a column's first batch looked at to choose its encoding.
const CARDINALITY_SAMPLE: usize = 4096;

/// `Some(true)` if a column's first batch has few distinct values (at most a quarter of
/// an evenly strided sample of [`CARDINALITY_SAMPLE`] non-null values), `Some(false)` if
/// mostly unique; `None` for types where the default is kept. Counted by sorting the
/// sample: this runs once per chunk and must stay cheap next to the chunk's encoding.
fn low_cardinality(a: &dyn Array) -> Option<bool> {
    let stride = a.len().div_ceil(CARDINALITY_SAMPLE).max(1);
    let rows = (0..a.len()).step_by(stride).filter(|&i| a.is_valid(i));
    let (distinct, sampled) = match a.data_type() {
        DataType::Utf8 => {
            let s = a.as_string::<i32>();
            distinct(rows.map(|i| s.value(i)).collect())
        }
        DataType::Int64 | DataType::Timestamp(..) => {
            let data = a.to_data();
            let v = &data.buffers()[0].typed_data::<i64>()[data.offset()..];
            distinct(rows.map(|i| v[i]).collect())
        }
        DataType::Int32 | DataType::Date32 => {
            let data = a.to_data();
            let v = &data.buffers()[0].typed_data::<i32>()[data.offset()..];
            distinct(rows.map(|i| v[i]).collect())
        }
        DataType::Float64 => {
            let f = a.as_primitive::<Float64Type>();
            distinct(rows.map(|i| f.value(i).to_bits()).collect())
        }
        _ => return None,
    };
    // a sample that met mostly nulls says too little
    (sampled >= 64).then_some(distinct <= sampled / 4)
}

/// (distinct values, values) of a sample.
fn distinct<T: Ord>(mut sample: Vec<T>) -> (usize, usize) {
    let n = sample.len();
    sample.sort_unstable();
    sample.dedup();
    (sample.len(), n)
}

/// A `std::io::Write` over an object-store upload, used from the writer thread: bytes
/// are gathered into large writes, each driven to completion on the runtime.
struct StoreSink {
    handle: Handle,
    inner: BufWriter,
    buf: Vec<u8>,
    written: u64,
    path: String,
}

impl StoreSink {
    /// Hands the gathered bytes to the upload as they are (no copy).
    fn push_out(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let buf = std::mem::replace(&mut self.buf, Vec::with_capacity(SINK_BUFFER));
        self.put(bytes::Bytes::from(buf))
    }

    fn put(&mut self, bytes: bytes::Bytes) -> std::io::Result<()> {
        let inner = &mut self.inner;
        self.handle
            .block_on(inner.put(bytes))
            .map_err(std::io::Error::other)
    }

    fn finish(mut self) -> Result<u64, WriteError> {
        let io = |e: std::io::Error, path: &str| WriteError::Io {
            path: path.to_owned(),
            reason: e.to_string(),
        };
        self.push_out().map_err(|e| io(e, &self.path))?;
        let inner = &mut self.inner;
        self.handle
            .block_on(inner.shutdown())
            .map_err(|e| io(e, &self.path))?;
        Ok(self.written)
    }
}

impl Write for StoreSink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        // the buffer is sent before it would have to grow (a grown Vec is a copy)
        if self.buf.len() + data.len() > SINK_BUFFER {
            self.push_out()?;
        }
        if data.len() >= SINK_BUFFER {
            self.put(bytes::Bytes::copy_from_slice(data))?;
        } else {
            self.buf.extend_from_slice(data);
        }
        self.written += data.len() as u64;
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_dirs() {
        assert_eq!(
            partition_dir(Some(Day::Finite(0)), Granularity::Day, "dt"),
            "dt=1970-01-01"
        );
        assert_eq!(
            partition_dir(Some(Day::Finite(19_792)), Granularity::Month, "dt"),
            "dt=2024-03"
        );
        assert_eq!(
            partition_dir(Some(Day::Finite(-1)), Granularity::Year, "dt"),
            "dt=1969"
        );
        assert_eq!(
            partition_dir(Some(Day::Finite(0)), Granularity::Day, "load_dt"),
            "load_dt=1970-01-01"
        );
        assert_eq!(
            partition_dir(None, Granularity::Day, "dt"),
            "dt=__HIVE_DEFAULT_PARTITION__"
        );
        assert_eq!(
            partition_dir(Some(Day::Infinity), Granularity::Day, "dt"),
            "dt=infinity"
        );
        assert_eq!(
            partition_dir(Some(Day::NegInfinity), Granularity::Day, "dt"),
            "dt=-infinity"
        );
        // chrono's range ends at 262143; Postgres's dates go on to 5874897
        let day = |d| partition_dir(Some(Day::Finite(d)), Granularity::Day, "dt");
        // the day counts are Postgres's (`'5874897-12-31'::date - '1970-01-01'`)
        assert_eq!(day(2_145_042_905), "dt=+5874897-12-31");
        assert_eq!(day(95_026_602), "dt=+262144-01-01");
        assert_eq!(day(-2_440_588), "dt=-4713-11-24"); // Postgres's first date, 4714 BC
        assert_eq!(day(-719_529), "dt=-0001-12-31"); // 2 BC's last day
        assert_eq!(day(2_932_896), "dt=9999-12-31");
        assert_eq!(day(2_932_897), "dt=+10000-01-01");
    }

    #[test]
    fn civil_dates_match_chrono_where_it_reaches() {
        let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap();
        for d in (-95_000_000_i64..95_000_000).step_by(9_973) {
            let c = epoch + chrono::Days::new(0) + chrono::TimeDelta::days(d);
            use chrono::Datelike;
            assert_eq!(
                civil_from_days(d),
                (i64::from(c.year()), c.month(), c.day()),
                "{d}"
            );
        }
    }

    #[test]
    fn low_cardinality_from_a_sample() {
        use arrow_array::{Int32Array, Int64Array, StringArray};
        let few = Int64Array::from_iter_values((0..50_000).map(|i| i % 10));
        assert_eq!(low_cardinality(&few), Some(true));
        let unique = Int64Array::from_iter_values(0..50_000);
        assert_eq!(low_cardinality(&unique), Some(false));
        assert_eq!(low_cardinality(&Int64Array::from(Vec::<i64>::new())), None);
        // a slice is sampled from its own offset
        let tail =
            Int64Array::from_iter_values((0..50_000).map(|i| if i < 25_000 { i } else { 7 }));
        assert_eq!(low_cardinality(&tail.slice(25_000, 25_000)), Some(true));
        assert_eq!(low_cardinality(&tail.slice(0, 25_000)), Some(false));
        let mostly_null = Int32Array::from_iter((0..50_000).map(|i| (i % 1000 == 0).then_some(i)));
        assert_eq!(
            low_cardinality(&mostly_null),
            None,
            "50 values are too few to judge"
        );
        let status =
            StringArray::from_iter_values((0..50_000).map(|i| ["new", "paid", "shipped"][i % 3]));
        assert_eq!(low_cardinality(&status), Some(true));
        let text = StringArray::from_iter_values((0..50_000).map(|i| format!("{{\"n\": {i}}}")));
        assert_eq!(low_cardinality(&text), Some(false));
    }
}
