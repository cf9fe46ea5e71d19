//! The actions of a table's log versions haul writes: version 0 (the table created,
//! empty), a job's commit (its parts added, an export's replaced parts removed, the
//! window and owner in `metaData.configuration`, the haul `txn`), and `commitInfo`.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

use super::TableCommit;
use super::state::{
    KEY_DATABASE, KEY_JOB, KEY_SCHEMA, KEY_SINCE, KEY_TABLE, KEY_WM_COLUMN, KEY_WM_HIGH,
    KEY_WM_LOW, KEY_WM_TYPE,
};
use crate::lake::delta::{self, Action, Add, Format, Metadata, Protocol, Remove, TableState, Txn};
use crate::lake::{JobManifest, PartFile};

/// A version's `commitInfo`: what it did, and haul's own record (`haul`).
pub(super) fn new_commit_info(
    operation: &str,
    parameters: Option<Value>,
    haul: Value,
) -> Map<String, Value> {
    let mut info = Map::new();
    info.insert(
        "timestamp".into(),
        json!(chrono::Utc::now().timestamp_millis()),
    );
    info.insert("operation".into(), json!(operation));
    if let Some(p) = parameters {
        info.insert("operationParameters".into(), p);
    }
    info.insert(
        "engineInfo".into(),
        json!(format!("haul/{}", env!("CARGO_PKG_VERSION"))),
    );
    info.insert("haul".into(), haul);
    info
}

/// Version 0 of a table: its protocol and schema, and the source table it holds.
pub(super) fn create_actions(c: &TableCommit<'_>) -> Vec<Action> {
    let partition_fields: Vec<String> = c.partition_field.map(str::to_owned).into_iter().collect();
    let (schema_string, ntz) = delta::schema_string(c.schema, &partition_fields);
    let info = new_commit_info("CREATE TABLE", None, json!({ "create": c.job }));
    let configuration = BTreeMap::from([
        (KEY_DATABASE.to_owned(), Some(c.identity.database.clone())),
        (KEY_SCHEMA.to_owned(), Some(c.identity.schema.clone())),
        (KEY_TABLE.to_owned(), Some(c.identity.table.clone())),
    ]);
    vec![
        Action::CommitInfo(info),
        Action::Protocol(protocol(None, ntz)),
        Action::Metadata(metadata(
            uuid::Uuid::new_v4().to_string(),
            schema_string,
            partition_fields,
            configuration,
            chrono::Utc::now().timestamp_millis(),
        )),
    ]
}

/// The actions of a job's commit on top of `state`.
pub(super) fn actions(
    c: &TableCommit<'_>,
    state: &TableState,
    legacy: Option<&JobManifest>,
    attempt: &str,
) -> Vec<Action> {
    let now = chrono::Utc::now().timestamp_millis();
    let version = state.version + 1;
    let partition_fields: Vec<String> = c.partition_field.map(str::to_owned).into_iter().collect();
    let (schema_string, ntz) = delta::schema_string(c.schema, &partition_fields);
    let mut configuration: BTreeMap<String, Option<String>> = state
        .metadata
        .as_ref()
        .map(|m| m.configuration.clone())
        .unwrap_or_default();
    let mut set = |k: &str, v: &str| {
        configuration.insert(k.to_owned(), Some(v.to_owned()));
    };
    set(KEY_DATABASE, &c.identity.database);
    set(KEY_SCHEMA, &c.identity.schema);
    set(KEY_TABLE, &c.identity.table);
    set(KEY_JOB, c.job.as_str());
    // an increment appends to the series (a first one appends to nothing)
    let append = c.window.is_some();
    if !append || c.window.is_some_and(|w| w.low.is_none()) || legacy.is_some() {
        set(KEY_SINCE, &version.to_string());
    }
    if let Some(w) = c.window {
        set(KEY_WM_COLUMN, &w.column);
        set(KEY_WM_TYPE, &w.pg_type);
        set(KEY_WM_HIGH, &w.high);
        match &w.low {
            Some(low) => set(KEY_WM_LOW, low),
            None => {
                configuration.remove(KEY_WM_LOW);
            }
        }
    } else {
        for k in [KEY_WM_COLUMN, KEY_WM_TYPE, KEY_WM_LOW, KEY_WM_HIGH] {
            configuration.remove(k);
        }
    }
    let mut out = Vec::new();
    let info = new_commit_info(
        "WRITE",
        Some(json!({
            "mode": if append { "Append" } else { "Overwrite" },
            "partitionBy": serde_json::to_string(&partition_fields).unwrap_or_default(),
        })),
        json!({
            "job": c.job,
            "attempt": attempt,
            "seq": c.base.seq + 1,
            "rows": c.manifest.rows,
            "window": c.window,
        }),
    );
    out.push(Action::CommitInfo(info));
    let old_protocol = state.protocol.clone();
    let needs_ntz = ntz
        && !old_protocol
            .as_ref()
            .and_then(|p| p.reader_features.as_ref())
            .is_some_and(|f| f.iter().any(|x| x == "timestampNtz"));
    if old_protocol.is_none() || needs_ntz {
        out.push(Action::Protocol(protocol(old_protocol.as_ref(), ntz)));
    }
    let old_meta = state.metadata.clone();
    out.push(Action::Metadata(metadata(
        old_meta
            .as_ref()
            .map(|m| m.id.clone())
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        schema_string,
        partition_fields.clone(),
        configuration,
        old_meta.and_then(|m| m.created_time).unwrap_or(now),
    )));
    out.push(Action::Txn(Txn {
        app_id: delta::APP_ID.into(),
        version: i64::try_from(c.base.seq + 1).unwrap_or(i64::MAX),
        last_updated: Some(now),
    }));
    if !append {
        for a in state.files.values() {
            out.push(Action::Remove(Remove {
                path: a.path.clone(),
                deletion_timestamp: Some(now),
                data_change: true,
                extended_file_metadata: Some(true),
                partition_values: Some(a.partition_values.clone()),
                size: Some(a.size),
            }));
        }
    }
    let field = c.partition_field;
    let mut adds: Vec<&PartFile> = c.manifest.files.iter().collect();
    if append {
        // taking over an older haul's series of increments: its parts join the log
        adds.extend(legacy.iter().flat_map(|l| l.files.iter()));
    }
    for f in adds {
        out.push(Action::Add(add_of(c.table_dir, f, field, now)));
    }
    out
}

/// A Parquet table's `metaData`.
fn metadata(
    id: String,
    schema_string: String,
    partition_columns: Vec<String>,
    configuration: BTreeMap<String, Option<String>>,
    created_time: i64,
) -> Metadata {
    Metadata {
        id,
        name: None,
        description: None,
        format: Format {
            provider: "parquet".into(),
            options: BTreeMap::new(),
        },
        schema_string,
        partition_columns,
        configuration,
        created_time: Some(created_time),
    }
}

pub(super) fn protocol(old: Option<&Protocol>, ntz: bool) -> Protocol {
    if !ntz {
        return old.cloned().unwrap_or(Protocol {
            min_reader_version: 1,
            min_writer_version: 2,
            reader_features: None,
            writer_features: None,
        });
    }
    let mut readers: BTreeSet<String> = old
        .and_then(|p| p.reader_features.clone())
        .into_iter()
        .flatten()
        .collect();
    let mut writers: BTreeSet<String> = old
        .and_then(|p| p.writer_features.clone())
        .into_iter()
        .flatten()
        .collect();
    readers.insert("timestampNtz".into());
    writers.insert("timestampNtz".into());
    Protocol {
        min_reader_version: 3,
        min_writer_version: 7,
        reader_features: Some(readers.into_iter().collect()),
        writer_features: Some(writers.into_iter().collect()),
    }
}

pub(super) fn add_of(table_dir: &str, f: &PartFile, field: Option<&str>, now: i64) -> Add {
    let rel = f
        .path
        .strip_prefix(table_dir)
        .map(|r| r.trim_start_matches('/'))
        .unwrap_or(&f.path);
    let mut partition_values = BTreeMap::new();
    if let Some(field) = field {
        let value = f
            .partition
            .strip_prefix(field)
            .and_then(|v| v.strip_prefix('='))
            .filter(|v| *v != "__HIVE_DEFAULT_PARTITION__")
            .map(str::to_owned);
        partition_values.insert(field.to_owned(), value);
    }
    Add {
        path: delta::encode_path(rel),
        partition_values,
        size: i64::try_from(f.bytes).unwrap_or(i64::MAX),
        modification_time: now,
        data_change: true,
        stats: Some(json!({ "numRecords": f.rows }).to_string()),
        tags: None,
    }
}
