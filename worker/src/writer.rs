//! Parquet writing for one chunk attempt, off the async runtime.
//!
//! Batches go through a bounded channel to one blocking-pool thread that owns the
//! chunk's Parquet writers (encoding and compression are CPU work). It keeps at most
//! [`MAX_OPEN_FILES`] part files open (least recently used closed first), flushes the
//! largest row group when encoded data passes [`BUFFER_BUDGET`], and rotates files at the
//! row/byte limits. Bytes stream to the object store as they are produced.
//!
//! A partitioned export groups each batch's rows by partition (slices of the batch, or
//! of one copy sorted by partition) and holds them back per partition: a partition's
//! rows are written once they fill a row group, everything held once the batches held
//! pass [`PENDING_BUDGET`], and the rest at the chunk's end, in partition order. So rows
//! in any order — a key that says nothing of the partition column's day — make about one
//! file per partition per chunk (one more per budget's worth of rows), not one per row.
//! Memory is bounded by those budgets, never by chunk or table size.

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
/// Batches held back for their partitions' rows (Arrow's in-memory size) before all
/// of them are written.
pub const PENDING_BUDGET: usize = 192 * 1024 * 1024;
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
    /// Staging prefix of this attempt (`_haul/staging/<job>/<chunk>/<epoch>`); its parts
    /// are staged flat under it, whatever their partition.
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
        Self::start_with_budget(dest, cfg, schema, PENDING_BUDGET)
    }

    fn start_with_budget(
        dest: Dest,
        cfg: WriterConfig,
        schema: SchemaRef,
        pending_budget: usize,
    ) -> Result<Self, WriteError> {
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
                held: HashMap::new(),
                next_held: 0,
                pending_bytes: 0,
                pending_budget,
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
    partition: Option<Partition>,
    props: Option<WriterProperties>,
    /// Least recently used first.
    open: Vec<OpenFile>,
    done: Vec<PartFile>,
    next_n: u32,
    /// A partitioned export's rows held back, by partition directory.
    pending: std::collections::BTreeMap<String, Pending>,
    /// The batches those rows are slices of: their size and slices still held.
    held: HashMap<u64, (usize, usize)>,
    next_held: u64,
    /// The held batches' in-memory size ...
    pending_bytes: usize,
    /// ... and its bound ([`PENDING_BUDGET`]).
    pending_budget: usize,
}

/// A batch's rows by partition directory.
type Groups = Vec<(String, RecordBatch)>;

/// The partition column's index, granularity and field name.
type Partition = (usize, Granularity, String);

/// Rows of one partition not yet written: slices, each with the batch it shares.
#[derive(Default)]
struct Pending {
    batches: Vec<(RecordBatch, u64)>,
    rows: usize,
}

impl Writers {
    fn run(&mut self, mut rx: mpsc::Receiver<RecordBatch>) -> Result<Vec<PartFile>, WriteError> {
        while let Some(batch) = rx.blocking_recv() {
            self.check_times(&batch)?;
            if self.props.is_none() {
                self.props = Some(self.properties(&batch));
            }
            match self.partition.clone() {
                None => self.write(String::new(), &batch)?,
                Some(partition) => self.hold(&batch, &partition)?,
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
    /// row group, and everything held once the batches held pass the budget.
    fn hold(&mut self, batch: &RecordBatch, partition: &Partition) -> Result<(), WriteError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let full = self.cfg.output.row_group_rows.max(1);
        let (groups, bytes) = Self::split(batch, partition)?;
        // the slices share one batch's buffers, which live until the last is written:
        // that batch is what counts against the budget, for as long as that
        let held = self.next_held;
        self.next_held += 1;
        self.held.insert(held, (bytes, groups.len()));
        self.pending_bytes += bytes;
        for (partition, rows) in groups {
            let p = self.pending.entry(partition.clone()).or_default();
            p.rows += rows.num_rows();
            p.batches.push((rows, held));
            if p.rows >= full {
                self.write_pending(&partition)?;
            }
        }
        if self.pending_bytes > self.pending_budget {
            // everything held, partition by partition: all of it is let go
            while let Some((partition, _)) = self.pending.first_key_value() {
                let partition = partition.clone();
                self.write_pending(&partition)?;
            }
        }
        Ok(())
    }

    /// Writes the rows held back for `partition`.
    fn write_pending(&mut self, partition: &str) -> Result<(), WriteError> {
        let Some(p) = self.pending.remove(partition) else {
            return Ok(());
        };
        for (b, held) in &p.batches {
            self.write(partition.to_owned(), b)?;
            if let Some((bytes, slices)) = self.held.get_mut(held) {
                *slices -= 1;
                if *slices == 0 {
                    self.pending_bytes -= *bytes;
                    self.held.remove(held);
                }
            }
        }
        Ok(())
    }

    /// A batch's rows grouped by partition directory (in order of first appearance):
    /// slices of the batch when each partition's rows are contiguous (rows in partition
    /// order), else slices of one copy sorted by partition; and the in-memory size of
    /// the batch they share.
    fn split(batch: &RecordBatch, partition: &Partition) -> Result<(Groups, usize), WriteError> {
        let (idx, gran, field) = partition;
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
        // each row's group: the directory is formatted once per distinct day, and a row
        // on the day of the row before it needs no lookup
        let mut dirs: Vec<String> = Vec::new();
        let mut by_dir: HashMap<String, u32> = HashMap::new();
        let mut by_day: HashMap<Option<Day>, u32, BuildDayHasher> = HashMap::default();
        let mut group = Vec::with_capacity(batch.num_rows());
        let mut last: Option<(Option<Day>, u32)> = None;
        for i in 0..batch.num_rows() {
            let day = key_of(i);
            let g = match last {
                Some((d, g)) if d == day => g,
                _ => match by_day.get(&day) {
                    Some(g) => *g,
                    None => {
                        let dir = partition_dir(day, *gran, field);
                        let g = match by_dir.get(&dir) {
                            Some(g) => *g,
                            None => {
                                by_dir.insert(dir.clone(), dirs.len() as u32);
                                dirs.push(dir);
                                dirs.len() as u32 - 1
                            }
                        };
                        by_day.insert(day, g);
                        g
                    }
                },
            };
            last = Some((day, g));
            group.push(g);
        }
        let mut counts = vec![0usize; dirs.len()];
        let mut first = vec![0usize; dirs.len()];
        let mut runs = 0;
        for (i, g) in group.iter().enumerate() {
            let g = *g as usize;
            if counts[g] == 0 {
                first[g] = i;
            }
            counts[g] += 1;
            if i == 0 || group[i - 1] as usize != g {
                runs += 1;
            }
        }
        let (grouped, start) = if runs == dirs.len() {
            // each partition's rows are one run (rows in partition order): slices of the
            // batch as it is
            (batch.clone(), first)
        } else {
            // else one stable counting sort by partition, one copy, and slices of it
            let mut start = vec![0usize; dirs.len()];
            for g in 1..dirs.len() {
                start[g] = start[g - 1] + counts[g - 1];
            }
            let mut next = start.clone();
            let mut order = vec![0u32; group.len()];
            for (i, g) in group.iter().enumerate() {
                order[next[*g as usize]] = i as u32;
                next[*g as usize] += 1;
            }
            let order = arrow_array::UInt32Array::from(order);
            let sorted = arrow_select::take::take_record_batch(batch, &order)
                .map_err(|e| WriteError::Task(format!("grouping rows by partition: {e}")))?;
            (sorted, start)
        };
        let groups = dirs
            .into_iter()
            .enumerate()
            .map(|(g, dir)| (dir, grouped.slice(start[g], counts[g])))
            .collect();
        Ok((groups, grouped.get_array_memory_size()))
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
        // staged flat (names are unique per attempt): no folder per partition to make
        let staged = format!("{}/{name}", self.cfg.staging);
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

/// A hasher for days (a few integers per key, looked up once per row): a multiply per
/// word instead of SipHash, which showed in profiles of partitioned exports.
#[derive(Default)]
struct DayHasher(u64);

impl std::hash::Hasher for DayHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_i64(&mut self, n: i64) {
        self.write_u64(n as u64);
    }
    fn write_isize(&mut self, n: isize) {
        self.write_u64(n as u64);
    }
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

type BuildDayHasher = std::hash::BuildHasherDefault<DayHasher>;

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

    /// Rows of 50 days in no order, in 10 batches: one file per partition while the
    /// budget holds them all; past it (a budget of nothing), everything held is written
    /// at each batch, so a file per partition per batch. Every row lands in its day.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rows_in_no_order_are_held_by_partition_within_the_budget() {
        use arrow_array::{Date32Array, Int64Array};
        use arrow_schema::{Field, Schema};
        for (budget, files) in [(PENDING_BUDGET, 50), (0, 500)] {
            let root =
                std::env::temp_dir().join(format!("haul-writer-{}-{budget}", std::process::id()));
            let dest = Dest::open(&format!("file://{}", root.display()), false).unwrap();
            let schema = Arc::new(Schema::new(vec![
                Field::new("id", DataType::Int64, false),
                Field::new("day", DataType::Date32, false),
            ]));
            let cfg = WriterConfig {
                output: OutputOptions {
                    partition_by: Some(haul_shared::jobs::PartitionBy::new(
                        "day",
                        Granularity::Day,
                    )),
                    ..Default::default()
                },
                table_dir: "t".into(),
                staging: "_haul/staging/j/0/1".into(),
                stem: "part-j-0".into(),
            };
            let w = ChunkWriter::start_with_budget(dest, cfg, Arc::clone(&schema), budget).unwrap();
            for b in 0..10i64 {
                let ids: Vec<i64> = (b * 1000..(b + 1) * 1000).collect();
                let days: Vec<i32> = ids.iter().map(|i| (i * 7919 % 50) as i32).collect();
                let batch = RecordBatch::try_new(
                    Arc::clone(&schema),
                    vec![
                        Arc::new(Int64Array::from(ids)),
                        Arc::new(Date32Array::from(days)),
                    ],
                )
                .unwrap();
                w.write(batch).await.unwrap();
            }
            let parts = w.finish().await.unwrap();
            assert_eq!(parts.len(), files, "budget {budget}");
            assert_eq!(parts.iter().map(|p| p.rows).sum::<u64>(), 10_000);
            for p in &parts {
                // each part's rows are all of its folder's day
                let f = std::fs::File::open(root.join(&p.staged)).unwrap();
                let r = parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(f, 1024)
                    .unwrap();
                for b in r {
                    let b = b.unwrap();
                    let days = b.column(1).as_primitive::<Date32Type>();
                    for d in days.values() {
                        let dir =
                            partition_dir(Some(Day::Finite((*d).into())), Granularity::Day, "dt");
                        assert_eq!(dir, p.partition);
                    }
                }
            }
            let _ = std::fs::remove_dir_all(&root);
        }
    }

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
