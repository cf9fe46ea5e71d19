//! A table's Delta Lake log (`<table>/_delta_log/`), the one commit point of a table.
//!
//! haul writes the part of the Delta protocol it needs, and reads what it writes (and
//! what another writer may add beside it, refusing features it cannot keep):
//! - version `n` is the object `_delta_log/<n, 20 digits>.json`, created if absent
//!   (`PutMode::Create`: a local create-new, S3's `If-None-Match: *`), one action a line:
//!   `protocol` and `metaData` (the Delta schema, partition columns and haul's records in
//!   `configuration`), `add`/`remove` of Parquet parts, `txn` (app id `haul`, version =
//!   the number of haul jobs the table holds), `commitInfo` (which job, which attempt);
//! - every [`CHECKPOINT_INTERVAL`] versions a classic checkpoint
//!   (`<n>.checkpoint.parquet` holding the table's state, and `_last_checkpoint`), so
//!   reading the latest version costs one checkpoint and fewer than that many commits
//!   whatever the table's age. The log is never read by listing it: versions are
//!   fetched from the last checkpoint on until one is absent.
//!
//! Why not `delta_kernel`: haul needs a small, fixed subset (appends and whole-table
//! replaces of files it wrote, a transaction id, checkpoints) around a commit protocol
//! of its own (intents, recovery: see [`super::table`]), and the kernel is ~180k lines
//! more to build on every cold machine whose CI budget is already tight. The `deltalake`
//! Python package (delta-rs) reads every table in the test suite, so this module cannot
//! drift from the protocol unnoticed.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow_schema::{DataType, Field, Fields, Schema, SchemaRef};
use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::{Dest, DestError, store_err};

/// A checkpoint is written after every this many versions (Delta's own default).
pub const CHECKPOINT_INTERVAL: u64 = 10;
/// The `txn` app id of haul's jobs: its version counts the jobs committed to the table.
pub const APP_ID: &str = "haul";
/// The folder of the log, under the table's.
pub const LOG_DIR: &str = "_delta_log";

/// Writer features haul keeps when it commits to a table (it writes nothing that any
/// other one would have to maintain).
const WRITER_FEATURES: &[&str] = &["timestampNtz", "appendOnly", "invariants"];

/// A data file added to the table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Add {
    /// Relative to the table's folder, percent-encoded.
    pub path: String,
    #[serde(default)]
    pub partition_values: BTreeMap<String, Option<String>>,
    pub size: i64,
    #[serde(default)]
    pub modification_time: i64,
    #[serde(default)]
    pub data_change: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<BTreeMap<String, Option<String>>>,
}

/// A data file removed from the table (a tombstone).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Remove {
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_timestamp: Option<i64>,
    #[serde(default)]
    pub data_change: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extended_file_metadata: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition_values: Option<BTreeMap<String, Option<String>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Format {
    pub provider: String,
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

/// The table's schema, partitioning and properties.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub format: Format,
    pub schema_string: String,
    #[serde(default)]
    pub partition_columns: Vec<String>,
    #[serde(default)]
    pub configuration: BTreeMap<String, Option<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_time: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Protocol {
    pub min_reader_version: i32,
    pub min_writer_version: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reader_features: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer_features: Option<Vec<String>>,
}

/// An application's transaction marker: the latest `version` it committed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Txn {
    pub app_id: String,
    pub version: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated: Option<i64>,
}

/// One line of a commit.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    Protocol(Protocol),
    Metadata(Metadata),
    Add(Add),
    Remove(Remove),
    Txn(Txn),
    CommitInfo(Map<String, Value>),
}

impl Action {
    fn to_value(&self) -> Value {
        match self {
            Action::Protocol(p) => json!({ "protocol": p }),
            Action::Metadata(m) => json!({ "metaData": m }),
            Action::Add(a) => json!({ "add": a }),
            Action::Remove(r) => json!({ "remove": r }),
            Action::Txn(t) => json!({ "txn": t }),
            Action::CommitInfo(c) => json!({ "commitInfo": c }),
        }
    }

    /// The action a line holds; `None` for actions haul does not track (`cdc`,
    /// `domainMetadata`, ...) and for empty checkpoint rows.
    fn parse(line: &str) -> Result<Option<Action>, serde_json::Error> {
        let obj: Map<String, Value> = serde_json::from_str(line)?;
        for (k, v) in obj {
            let a = match k.as_str() {
                "protocol" => Action::Protocol(serde_json::from_value(v)?),
                "metaData" => Action::Metadata(serde_json::from_value(v)?),
                "add" => Action::Add(serde_json::from_value(v)?),
                "remove" => Action::Remove(serde_json::from_value(v)?),
                "txn" => Action::Txn(serde_json::from_value(v)?),
                "commitInfo" => match v {
                    Value::Object(m) => Action::CommitInfo(m),
                    _ => continue,
                },
                _ => continue,
            };
            return Ok(Some(a));
        }
        Ok(None)
    }
}

/// The table as of one version.
#[derive(Clone, Debug, Default)]
pub struct TableState {
    pub version: u64,
    pub protocol: Option<Protocol>,
    pub metadata: Option<Metadata>,
    /// The table's files, by their (encoded) path.
    pub files: BTreeMap<String, Add>,
    pub txns: BTreeMap<String, i64>,
}

impl TableState {
    fn apply(&mut self, a: Action) {
        match a {
            Action::Protocol(p) => self.protocol = Some(p),
            Action::Metadata(m) => self.metadata = Some(m),
            Action::Add(a) => {
                self.files.insert(a.path.clone(), a);
            }
            Action::Remove(r) => {
                self.files.remove(&r.path);
            }
            Action::Txn(t) => {
                self.txns.insert(t.app_id, t.version);
            }
            Action::CommitInfo(_) => {}
        }
    }

    /// How many haul jobs the table holds (its `txn` version for haul).
    pub fn haul_seq(&self) -> u64 {
        self.txns
            .get(APP_ID)
            .copied()
            .unwrap_or_default()
            .max(0)
            .unsigned_abs()
    }

    /// A property of the table (`metaData.configuration`).
    pub fn config(&self, key: &str) -> Option<&str> {
        self.metadata.as_ref()?.configuration.get(key)?.as_deref()
    }

    /// Refuses a table whose protocol asks a writer for what haul does not do (deletion
    /// vectors, column mapping, ...): committing to it could break it for its readers.
    pub fn check_writable(&self, table_dir: &str) -> Result<(), DestError> {
        let Some(p) = &self.protocol else {
            return Ok(());
        };
        let unsupported: Vec<&str> = match p.min_writer_version {
            ..=2 => Vec::new(),
            7 => p
                .writer_features
                .iter()
                .flatten()
                .map(String::as_str)
                .filter(|f| !WRITER_FEATURES.contains(f))
                .collect(),
            _ => vec!["writer version 3-6"],
        };
        if unsupported.is_empty() {
            return Ok(());
        }
        Err(DestError::UnsupportedTable {
            table_dir: table_dir.to_owned(),
            reason: format!(
                "its Delta log asks writers for {} (written by another tool), which haul does not keep",
                unsupported.join(", ")
            ),
        })
    }

    /// Every action of a checkpoint of this state.
    fn checkpoint_actions(&self) -> Vec<Action> {
        let mut out = Vec::with_capacity(self.files.len() + self.txns.len() + 2);
        out.extend(self.protocol.clone().map(Action::Protocol));
        out.extend(self.metadata.clone().map(Action::Metadata));
        out.extend(self.txns.iter().map(|(app, v)| {
            Action::Txn(Txn {
                app_id: app.clone(),
                version: *v,
                last_updated: None,
            })
        }));
        out.extend(self.files.values().cloned().map(Action::Add));
        out
    }
}

/// What `_last_checkpoint` holds.
#[derive(Debug, Serialize, Deserialize)]
struct LastCheckpoint {
    version: u64,
    size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    parts: Option<u64>,
}

/// The log of the table in `table_dir` of a destination.
pub struct DeltaLog<'a> {
    dest: &'a Dest,
    table_dir: String,
}

impl<'a> DeltaLog<'a> {
    pub fn new(dest: &'a Dest, table_dir: &str) -> Self {
        DeltaLog {
            dest,
            table_dir: table_dir.to_owned(),
        }
    }

    fn path(&self, name: &str) -> Path {
        self.dest
            .path(&format!("{}/{LOG_DIR}/{name}", self.table_dir))
    }

    /// The object of version `v`.
    pub fn version_path(&self, v: u64) -> Path {
        self.path(&format!("{v:020}.json"))
    }

    fn checkpoint_path(&self, v: u64) -> Path {
        self.path(&format!("{v:020}.checkpoint.parquet"))
    }

    /// The actions of version `v`, `None` if it does not exist.
    pub async fn read_version(&self, v: u64) -> Result<Option<Vec<Action>>, DestError> {
        let path = self.version_path(v);
        let bytes = match self.dest.store.get(&path).await {
            Ok(r) => r.bytes().await.map_err(store_err(&path))?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(store_err(&path)(e)),
        };
        parse_lines(&path, &bytes).map(Some)
    }

    /// The table as of its latest version; `None` when it has no log.
    pub async fn read(&self) -> Result<Option<TableState>, DestError> {
        let last: Option<LastCheckpoint> =
            self.dest.get_json(&self.path("_last_checkpoint")).await?;
        let (mut state, mut next) = match last {
            Some(cp) => {
                if cp.parts.is_some_and(|p| p > 1) {
                    return Err(DestError::UnsupportedTable {
                        table_dir: self.table_dir.clone(),
                        reason: "its Delta log has a multi-part checkpoint (written by another tool), which haul does not read".into(),
                    });
                }
                (self.read_checkpoint(cp.version).await?, cp.version + 1)
            }
            None => (TableState::default(), 0),
        };
        let mut found = next > 0;
        while let Some(actions) = self.read_version(next).await? {
            for a in actions {
                state.apply(a);
            }
            state.version = next;
            found = true;
            next += 1;
        }
        Ok(found.then_some(state))
    }

    /// Creates version `v` with `actions` if no one did: `false` when it exists.
    pub async fn try_commit(&self, v: u64, actions: &[Action]) -> Result<bool, DestError> {
        let mut body = Vec::new();
        for a in actions {
            serde_json::to_writer(&mut body, &a.to_value()).expect("actions serialize");
            body.push(b'\n');
        }
        let path = self.version_path(v);
        match self
            .dest
            .store
            .put_opts(
                &path,
                PutPayload::from(body),
                PutOptions::from(PutMode::Create),
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(store_err(&path)(e)),
        }
    }

    /// Writes a checkpoint of `state` (at its version) and points `_last_checkpoint` at
    /// it. Either write may be repeated; a reader that finds no checkpoint reads commits.
    pub async fn checkpoint(&self, state: &TableState) -> Result<(), DestError> {
        let path = self.checkpoint_path(state.version);
        let bytes = encode_checkpoint(&state.checkpoint_actions()).map_err(|reason| {
            DestError::BadManifest {
                path: path.to_string(),
                reason,
            }
        })?;
        let rows = state.files.len() + state.txns.len() + 2;
        self.dest
            .store
            .put(&path, PutPayload::from(bytes))
            .await
            .map_err(store_err(&path))?;
        self.dest
            .put_json(
                &self.path("_last_checkpoint"),
                &LastCheckpoint {
                    version: state.version,
                    size: rows as u64,
                    parts: None,
                },
                false,
            )
            .await?;
        Ok(())
    }

    async fn read_checkpoint(&self, v: u64) -> Result<TableState, DestError> {
        let path = self.checkpoint_path(v);
        let bytes = self
            .dest
            .store
            .get(&path)
            .await
            .map_err(store_err(&path))?
            .bytes()
            .await
            .map_err(store_err(&path))?;
        let bad = |reason: String| DestError::BadManifest {
            path: path.to_string(),
            reason,
        };
        let lines = tokio::task::spawn_blocking(move || decode_checkpoint(bytes))
            .await
            .map_err(|e| bad(e.to_string()))?
            .map_err(bad)?;
        let mut state = TableState {
            version: v,
            ..TableState::default()
        };
        for a in parse_lines(&path, &lines)? {
            state.apply(a);
        }
        Ok(state)
    }
}

fn parse_lines(path: &Path, bytes: &[u8]) -> Result<Vec<Action>, DestError> {
    let mut out = Vec::new();
    for line in bytes.split(|b| *b == b'\n') {
        let line = std::str::from_utf8(line).map_err(|e| DestError::BadManifest {
            path: path.to_string(),
            reason: e.to_string(),
        })?;
        if line.trim().is_empty() {
            continue;
        }
        out.extend(Action::parse(line).map_err(|e| DestError::BadManifest {
            path: path.to_string(),
            reason: e.to_string(),
        })?);
    }
    Ok(out)
}

/// The Arrow schema of a classic checkpoint (the fields haul writes and reads).
fn checkpoint_schema() -> SchemaRef {
    let s = || DataType::Utf8;
    let map = || {
        DataType::Map(
            Arc::new(Field::new(
                "key_value",
                DataType::Struct(Fields::from(vec![
                    Field::new("key", DataType::Utf8, false),
                    Field::new("value", DataType::Utf8, true),
                ])),
                false,
            )),
            false,
        )
    };
    let list = || DataType::List(Arc::new(Field::new("element", DataType::Utf8, true)));
    let strukt = |fields: Vec<Field>| DataType::Struct(Fields::from(fields));
    Arc::new(Schema::new(vec![
        Field::new(
            "txn",
            strukt(vec![
                Field::new("appId", s(), true),
                Field::new("version", DataType::Int64, true),
                Field::new("lastUpdated", DataType::Int64, true),
            ]),
            true,
        ),
        Field::new(
            "add",
            strukt(vec![
                Field::new("path", s(), true),
                Field::new("partitionValues", map(), true),
                Field::new("size", DataType::Int64, true),
                Field::new("modificationTime", DataType::Int64, true),
                Field::new("dataChange", DataType::Boolean, true),
                Field::new("stats", s(), true),
                Field::new("tags", map(), true),
            ]),
            true,
        ),
        Field::new(
            "remove",
            strukt(vec![
                Field::new("path", s(), true),
                Field::new("deletionTimestamp", DataType::Int64, true),
                Field::new("dataChange", DataType::Boolean, true),
                Field::new("extendedFileMetadata", DataType::Boolean, true),
                Field::new("partitionValues", map(), true),
                Field::new("size", DataType::Int64, true),
            ]),
            true,
        ),
        Field::new(
            "metaData",
            strukt(vec![
                Field::new("id", s(), true),
                Field::new("name", s(), true),
                Field::new("description", s(), true),
                Field::new(
                    "format",
                    strukt(vec![
                        Field::new("provider", s(), true),
                        Field::new("options", map(), true),
                    ]),
                    true,
                ),
                Field::new("schemaString", s(), true),
                Field::new("partitionColumns", list(), true),
                Field::new("configuration", map(), true),
                Field::new("createdTime", DataType::Int64, true),
            ]),
            true,
        ),
        Field::new(
            "protocol",
            strukt(vec![
                Field::new("minReaderVersion", DataType::Int32, true),
                Field::new("minWriterVersion", DataType::Int32, true),
                Field::new("readerFeatures", list(), true),
                Field::new("writerFeatures", list(), true),
            ]),
            true,
        ),
    ]))
}

/// A checkpoint's Parquet bytes: the actions decoded from their JSON form into the
/// checkpoint schema (one action a row).
fn encode_checkpoint(actions: &[Action]) -> Result<Bytes, String> {
    let schema = checkpoint_schema();
    let mut decoder = arrow_json::ReaderBuilder::new(Arc::clone(&schema))
        .with_batch_size(8192)
        .build_decoder()
        .map_err(|e| e.to_string())?;
    let mut writer = parquet::arrow::ArrowWriter::try_new(Vec::new(), schema, None)
        .map_err(|e| e.to_string())?;
    for chunk in actions.chunks(8192) {
        let mut lines = Vec::new();
        for a in chunk {
            serde_json::to_writer(&mut lines, &a.to_value()).expect("actions serialize");
            lines.push(b'\n');
        }
        let mut rest = &lines[..];
        while !rest.is_empty() {
            let n = decoder.decode(rest).map_err(|e| e.to_string())?;
            rest = &rest[n..];
            if let Some(batch) = decoder.flush().map_err(|e| e.to_string())? {
                writer.write(&batch).map_err(|e| e.to_string())?;
            }
        }
    }
    if let Some(batch) = decoder.flush().map_err(|e| e.to_string())? {
        writer.write(&batch).map_err(|e| e.to_string())?;
    }
    writer
        .into_inner()
        .map(Bytes::from)
        .map_err(|e| e.to_string())
}

/// A checkpoint's rows as JSON lines (null fields left out).
fn decode_checkpoint(bytes: Bytes) -> Result<Vec<u8>, String> {
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
        .map_err(|e| e.to_string())?
        .build()
        .map_err(|e| e.to_string())?;
    let mut writer = arrow_json::LineDelimitedWriter::new(Vec::new());
    for batch in reader {
        let batch = batch.map_err(|e| e.to_string())?;
        writer.write(&batch).map_err(|e| e.to_string())?;
    }
    writer.finish().map_err(|e| e.to_string())?;
    Ok(writer.into_inner())
}

/// The Delta schema (`schemaString`) of Parquet files with `schema`, plus a string
/// column per partition field (their values live in the folder names, not the files),
/// and whether it needs the `timestampNtz` feature. Types Delta lacks are declared as
/// the nearest one that holds the value exactly, with the file's type in the field's
/// metadata: `time` as `long` (microseconds since midnight), `numeric` above 38 digits
/// as `string`.
pub fn schema_string(schema: &Schema, partition_fields: &[String]) -> (String, bool) {
    let mut ntz = false;
    let mut fields: Vec<Value> = schema
        .fields()
        .iter()
        .map(|f| delta_field(f, &mut ntz))
        .collect();
    for p in partition_fields {
        fields.push(json!({"name": p, "type": "string", "nullable": true, "metadata": {}}));
    }
    (json!({"type": "struct", "fields": fields}).to_string(), ntz)
}

fn delta_field(f: &Field, ntz: &mut bool) -> Value {
    let mut metadata = Map::new();
    if let Some(t) = f.metadata().get("haul.pg_type") {
        metadata.insert("haul.pg_type".into(), Value::String(t.clone()));
    }
    let ty = delta_type(f.data_type(), ntz, &mut metadata);
    json!({"name": f.name(), "type": ty, "nullable": f.is_nullable(), "metadata": metadata})
}

fn delta_type(dt: &DataType, ntz: &mut bool, metadata: &mut Map<String, Value>) -> Value {
    let mut note = |what: &str| {
        metadata.insert("haul.stored_as".into(), Value::String(what.into()));
    };
    let name = match dt {
        DataType::Boolean => "boolean",
        DataType::Int8 => "byte",
        DataType::Int16 => "short",
        DataType::Int32 => "integer",
        DataType::Int64 | DataType::UInt32 => "long",
        DataType::Float32 => "float",
        DataType::Float64 => "double",
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "string",
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => "binary",
        DataType::FixedSizeBinary(_) => {
            note("fixed-size binary");
            "binary"
        }
        DataType::Date32 => "date",
        DataType::Timestamp(_, Some(_)) => "timestamp",
        DataType::Timestamp(_, None) => {
            *ntz = true;
            "timestamp_ntz"
        }
        DataType::Time64(_) | DataType::Time32(_) => {
            note("time: microseconds since midnight");
            "long"
        }
        DataType::Decimal128(p, s) => return Value::String(format!("decimal({p},{s})")),
        DataType::Decimal256(p, s) => {
            note(&format!(
                "decimal({p},{s}), above Delta's 38 digits: as text"
            ));
            "string"
        }
        DataType::List(e) | DataType::LargeList(e) => {
            let mut inner = Map::new();
            return json!({
                "type": "array",
                "elementType": delta_type(e.data_type(), ntz, &mut inner),
                "containsNull": e.is_nullable(),
            });
        }
        DataType::Struct(fields) => {
            let fields: Vec<Value> = fields.iter().map(|f| delta_field(f, ntz)).collect();
            return json!({"type": "struct", "fields": fields});
        }
        other => {
            note(&format!("{other}"));
            "string"
        }
    };
    Value::String(name.into())
}

/// A relative path as Delta's `add.path` holds it (RFC 2396, `/` kept).
pub fn encode_path(rel: &str) -> String {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'/')
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'=')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(rel, SET).to_string()
}

/// `add.path` back to a relative path.
pub fn decode_path(p: &str) -> String {
    percent_encoding::percent_decode_str(p)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(p: &str) -> Action {
        Action::Add(Add {
            path: p.into(),
            partition_values: BTreeMap::from([("dt".into(), Some("2024-01-01".into()))]),
            size: 10,
            modification_time: 1,
            data_change: true,
            stats: Some(r#"{"numRecords":3}"#.into()),
            tags: None,
        })
    }

    #[test]
    fn a_checkpoint_reads_back_as_the_state_it_was_made_of() {
        let mut s = TableState::default();
        s.apply(Action::Protocol(Protocol {
            min_reader_version: 3,
            min_writer_version: 7,
            reader_features: Some(vec!["timestampNtz".into()]),
            writer_features: Some(vec!["timestampNtz".into()]),
        }));
        s.apply(Action::Metadata(Metadata {
            id: "x".into(),
            name: None,
            description: None,
            format: Format {
                provider: "parquet".into(),
                options: BTreeMap::new(),
            },
            schema_string: "{}".into(),
            partition_columns: vec!["dt".into()],
            configuration: BTreeMap::from([("haul.job".into(), Some("j1".into()))]),
            created_time: Some(5),
        }));
        s.apply(Action::Txn(Txn {
            app_id: APP_ID.into(),
            version: 4,
            last_updated: None,
        }));
        for i in 0..3 {
            s.apply(add(&format!("dt=2024-01-01/part-{i}.parquet")));
        }
        let bytes = encode_checkpoint(&s.checkpoint_actions()).unwrap();
        let lines = decode_checkpoint(bytes).unwrap();
        let mut back = TableState::default();
        for a in parse_lines(&Path::from("x"), &lines).unwrap() {
            back.apply(a);
        }
        assert_eq!(back.protocol, s.protocol);
        assert_eq!(back.metadata, s.metadata);
        assert_eq!(back.files, s.files);
        assert_eq!(back.haul_seq(), 4);
    }

    #[test]
    fn paths_are_encoded_as_uris() {
        assert_eq!(
            encode_path("dt=2024-01-01/part-a_b.parquet"),
            "dt=2024-01-01/part-a_b.parquet"
        );
        assert_eq!(encode_path("a b/c%d"), "a%20b/c%25d");
        assert_eq!(decode_path(&encode_path("a b/c%d")), "a b/c%d");
    }
}
