//! Postgres: connection settings, secrets, quoting, table introspection and the
//! Postgres → Arrow type mapping (the table in README.md documents it).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use arrow_schema::{DataType, Field, Fields, Schema, TimeUnit};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::tls::NoTlsStream;
use tokio_postgres::{Client, Connection, NoTls};

pub use conninfo::{ConnInfo, Credentials, Database, DsnError, PasswordSource, Target, redact};
pub use stream::{PgStream, SslMode};

mod conninfo;
mod stream;

use crate::error::{Classify, ErrorClass};

/// A secret (a DSN with a password, a token). `Debug` and `Display` print it masked;
/// only [`Secret::expose`] gives the value, at the point of use.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", redact(&self.0))
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(&self.0))
    }
}

/// Quotes an identifier for SQL: `my "t"` → `"my ""t"""`.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quotes a string literal (sessions run with `standard_conforming_strings = on`).
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("invalid source DSN {dsn}: {reason}")]
    BadDsn { dsn: String, reason: String },
    #[error("cannot connect to source {dsn}: {reason}")]
    Connect {
        dsn: String,
        reason: String,
        transient: bool,
    },
    #[error("table {table} does not exist (or is not visible to this user); check --table")]
    TableNotFound { table: String },
    #[error(
        "permission denied: the source user cannot SELECT from {table}; GRANT SELECT ON {table} TO <user>"
    )]
    PermissionDenied { table: String },
    #[error(
        "permission denied: {reason}; the source user needs USAGE on the table's schema (GRANT USAGE ON SCHEMA <schema> TO <user>)"
    )]
    SchemaPermissionDenied { reason: String },
    #[error(
        "permission denied: the source user cannot SELECT column(s) {columns} of {table}; pass --columns with the columns it can read, or GRANT SELECT ON {table} TO <user>"
    )]
    ColumnsNotReadable { table: String, columns: String },
    #[error(
        "{relation} is a {kind}, not a table; haul extracts tables, partitioned tables and materialized views"
    )]
    NotATable { relation: String, kind: String },
    #[error(
        "column {column:?} does not exist in {table}; check --columns/--key/--partition-by/--cast"
    )]
    ColumnNotFound { table: String, column: String },
    /// Every column of the table whose type haul cannot map, `(column, type)`: named
    /// together, so that one rerun with the casts given fixes them all.
    #[error("{}", unsupported_types(.columns))]
    UnsupportedTypes { columns: Vec<(String, String)> },
    #[error("--cast {column}={target}: {reason}")]
    BadCast {
        column: String,
        target: String,
        reason: String,
    },
    #[error(
        "key column {column:?} has type {pg_type}, which has no btree ordering; choose another --key"
    )]
    KeyNotOrderable { column: String, pg_type: String },
    #[error(
        "key column(s) {columns} hold text that is not valid in the database's encoding or not UTF-8 (an SQL_ASCII database?), so haul cannot cut the key into ranges ({reason}); split on the key's bytes with {casts}, or by pages with --split ctid"
    )]
    KeyNotText {
        columns: String,
        casts: String,
        reason: String,
    },
    #[error(
        "{table} has no primary key or unique not-null index to split on, and no ctid ranges (partitioned tables need one); pass --key <column>"
    )]
    NoKey { table: String },
    #[error(
        "the job's snapshot {snapshot} is gone (the transaction holding it ended); rerun with --resume <job> --fresh-snapshot"
    )]
    SnapshotLost { snapshot: String },
    #[error(
        "cannot export a snapshot on this source ({reason}); pass --no-snapshot to read each chunk at its own point in time"
    )]
    SnapshotUnsupported { reason: String },
    #[error(
        "the source is behind a pooler that shares server connections between transactions (PgBouncer's pool_mode=transaction or statement): haul's session settings and the session holding the job's snapshot need server connections of their own; point --source at Postgres itself, or at a pool in session mode"
    )]
    TransactionPooled,
    #[error("{context}: {reason}")]
    Query {
        context: String,
        reason: String,
        class: ErrorClass,
    },
    #[error("column {column:?}: {reason}")]
    Decode { column: String, reason: String },
}

impl Classify for SourceError {
    fn class(&self) -> ErrorClass {
        match self {
            SourceError::Connect { transient, .. } => {
                if *transient {
                    ErrorClass::Transient
                } else {
                    ErrorClass::User
                }
            }
            SourceError::Query { class, .. } => *class,
            // everything else needs the user to change something (a lost snapshot: resume
            // under a fresh one)
            _ => ErrorClass::User,
        }
    }
}

/// `column "r" has type int4range, which haul cannot map to Arrow; pass --cast r=text to
/// export its text form`, or the same for several columns at once.
fn unsupported_types(columns: &[(String, String)]) -> String {
    let casts = columns
        .iter()
        .map(|(c, _)| cast_flag(c))
        .collect::<Vec<_>>()
        .join(" ");
    match columns {
        [(c, t)] => format!(
            "column {c:?} has type {t}, which haul cannot map to Arrow; pass {casts} to export its text form"
        ),
        _ => {
            let named = columns
                .iter()
                .map(|(c, t)| format!("{c:?} ({t})"))
                .collect::<Vec<_>>()
                .join(", ");
            format!(
                "columns {named} have types haul cannot map to Arrow; pass {casts} to export their text form"
            )
        }
    }
}

/// `--cast <column>=text`, quoted for a shell when the name needs it.
fn cast_flag(column: &str) -> String {
    cast_flag_to(column, "text")
}

/// `--cast <column>=<type>`, quoted for a shell when the name needs it.
pub fn cast_flag_to(column: &str, pg_type: &str) -> String {
    if column
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        format!("--cast {column}={pg_type}")
    } else {
        format!("--cast '{}={pg_type}'", column.replace('\'', "'\\''"))
    }
}

impl SourceError {
    /// Wraps a driver error from a query, deciding its class from the SQLSTATE.
    pub fn query(context: impl Into<String>, e: tokio_postgres::Error) -> Self {
        let class = classify_pg(&e);
        SourceError::Query {
            context: context.into(),
            reason: pg_reason(&e),
            class,
        }
    }
}

/// The server's message (not the driver's generic "db error").
pub fn pg_reason(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.hint() {
            Some(h) => format!("{} (hint: {h})", db.message()),
            None => db.message().to_owned(),
        },
        None => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(inner) = src {
                s = format!("{s}: {inner}");
                src = inner.source();
            }
            s
        }
    }
}

/// SQLSTATE classes worth retrying: connection exception, insufficient resources,
/// operator intervention (admin shutdown, cancel), transaction rollback (serialization
/// failure, deadlock).
const TRANSIENT_SQLSTATE_CLASSES: [&str; 4] = ["08", "53", "57", "40"];

pub fn classify_pg(e: &tokio_postgres::Error) -> ErrorClass {
    match e.code() {
        Some(code) => sqlstate_class(code.code()),
        // no SQLSTATE: an I/O or protocol failure on the connection
        None => ErrorClass::Transient,
    }
}

/// The class of a server error, from its SQLSTATE.
pub fn sqlstate_class(c: &str) -> ErrorClass {
    if TRANSIENT_SQLSTATE_CLASSES.iter().any(|t| c.starts_with(t)) {
        ErrorClass::Transient
    } else if c.starts_with("XX") {
        ErrorClass::Internal
    } else {
        ErrorClass::User
    }
}

/// Session settings every haul connection runs with, so that text forms (key bounds,
/// casts) are the same on every session.
pub const SESSION_SETUP: &str = "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; \
     SET IntervalStyle = 'postgres'; SET extra_float_digits = 3; \
     SET standard_conforming_strings = on; SET bytea_output = 'hex'; \
     SET statement_timeout = 0; SET idle_in_transaction_session_timeout = 0; \
     SET application_name = 'haul'";

/// Opens a session on the first of `info`'s hosts that accepts it: the socket, TLS as
/// `sslmode` says, then startup and authentication with the password `creds` find. `wrap`
/// turns the socket into what the driver speaks on (the chunk reader lends it through a
/// wrapper it can take it back from).
pub async fn connect_raw<S>(
    db: &Database,
    mut wrap: impl FnMut(PgStream) -> S,
) -> Result<(Client, Connection<S, NoTlsStream>), SourceError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (info, creds) = (&db.info, &db.creds);
    let fail = |reason: String, transient: bool| SourceError::Connect {
        dsn: info.to_string(),
        reason,
        transient,
    };
    let bad = |e: DsnError| SourceError::BadDsn {
        dsn: info.to_string(),
        reason: e.to_string(),
    };
    let policy = stream::TlsPolicy::new(info).map_err(|e| fail(e.reason, e.transient))?;
    let targets = info.targets().map_err(bad)?;
    let (user, dbname) = (info.user().map_err(bad)?, info.dbname().map_err(bad)?);
    let mut last = None;
    for target in &targets {
        let mut config = tokio_postgres::Config::new();
        config
            .user(&user)
            .dbname(&dbname)
            .ssl_mode(tokio_postgres::config::SslMode::Disable)
            .channel_binding(tokio_postgres::config::ChannelBinding::Disable);
        if let Some(o) = info.get("options") {
            config.options(o);
        }
        let password = creds
            .password_for(info, target, &dbname, &user)
            .map_err(|e| fail(e.to_string(), false))?;
        if let Some((pw, _)) = &password {
            config.password(pw.expose());
        }
        // allow: plain first, TLS when the server refuses it
        let mut tries: &[bool] = match policy.mode {
            SslMode::Disable => &[false],
            SslMode::Allow => &[false, true],
            _ => &[true],
        };
        while let Some((&tls, rest)) = tries.split_first() {
            tries = rest;
            let stream = match stream::open(info, target, &policy, tls).await {
                Ok(s) => s,
                Err(e) if e.transient => {
                    last = Some(fail(format!("{target}: {}", e.reason), true));
                    break;
                }
                Err(e) => return Err(fail(e.reason, false)),
            };
            let encrypted = stream.is_tls();
            match config.connect_raw(wrap(stream), NoTls).await {
                Ok(pair) => return Ok(pair),
                Err(e) if !rest.is_empty() && e.code().is_some_and(|c| c.code() == "28000") => {}
                Err(e) => {
                    let (reason, transient) = login_error(
                        &e,
                        target,
                        &user,
                        encrypted,
                        password.as_ref().map(|p| &p.1),
                    );
                    if !transient {
                        return Err(fail(reason, false));
                    }
                    last = Some(fail(reason, true));
                }
            }
        }
    }
    Err(last.unwrap_or_else(|| fail("no host to connect to".into(), false)))
}

/// A failed startup, said the way a user can act on it.
fn login_error(
    e: &tokio_postgres::Error,
    target: &Target,
    user: &str,
    encrypted: bool,
    password: Option<&PasswordSource>,
) -> (String, bool) {
    let code = e.code().map(|c| c.code());
    let reason = pg_reason(e);
    match code {
        Some("28P01") => (
            match password {
                Some(from) => format!("{reason} (the password came from {from})"),
                None => reason,
            },
            false,
        ),
        Some("28000") if !encrypted && reason.contains("no encryption") => (
            format!(
                "{reason}: {target} accepts only TLS connections from here; use sslmode=require or stronger (verify-full with sslrootcert=<CA file>)"
            ),
            false,
        ),
        Some(c) if c.starts_with("28") || c == "3D000" || c == "42501" => (reason, false),
        None if reason.contains("password missing") => (
            format!(
                "{target} asks for a password for user {user:?} and none was found: set PGPASSWORD, add a line to ~/.pgpass (or PGPASSFILE), or give a password file (--source-password-file / --target-password-file)"
            ),
            false,
        ),
        _ => (format!("{target}: {reason}"), classify_pg(e).is_retryable()),
    }
}

/// Refuses a source reached through a pooler that hands the server connection to other
/// clients between transactions. `session` has just run a statement outside a
/// transaction; a second client then begins a transaction: behind such a pooler it gets
/// the very server connection the first one used (poolers reuse the last one released),
/// which a session of its own never shares.
pub async fn refuse_transaction_pooling(
    db: &Database,
    session: &Session,
) -> Result<(), SourceError> {
    let mine = backend_pid(&session.client).await?;
    let other = connect(db).await?;
    other
        .client
        .batch_execute("BEGIN")
        .await
        .map_err(|e| SourceError::query("checking for a pooler", e))?;
    let theirs = backend_pid(&other.client).await?;
    let _ = other.client.batch_execute("ROLLBACK").await;
    if mine == theirs {
        return Err(SourceError::TransactionPooled);
    }
    Ok(())
}

/// The server process of a session (a simple query: no prepared statement).
async fn backend_pid(client: &Client) -> Result<String, SourceError> {
    let rows = client
        .simple_query("SELECT pg_backend_pid()")
        .await
        .map_err(|e| SourceError::query("checking for a pooler", e))?;
    rows.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .ok_or_else(|| SourceError::Query {
            context: "checking for a pooler".into(),
            reason: "pg_backend_pid() returned no row".into(),
            class: ErrorClass::Internal,
        })
}

/// A connected session. `closed` resolves when the connection ends, for whatever reason.
pub struct Session {
    pub client: Client,
    pub closed: tokio::sync::watch::Receiver<bool>,
}

/// Connects and applies [`SESSION_SETUP`].
pub async fn connect(db: &Database) -> Result<Session, SourceError> {
    let (client, connection) = connect_raw(db, |s| s).await?;
    let (tx, closed) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "source connection ended");
        }
        let _ = tx.send(true);
    });
    client
        .batch_execute(SESSION_SETUP)
        .await
        .map_err(|e| SourceError::query("session setup", e))?;
    Ok(Session { client, closed })
}

/// How a column's values arrive (binary COPY) and which Arrow type holds them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PgKind {
    Bool,
    Int2,
    Int4,
    Int8,
    /// `oid`, unsigned 32-bit; held as Int64.
    Oid,
    Float4,
    Float8,
    /// `numeric(p, s)`; p ≤ 38 → Decimal128, p ≤ 76 → Decimal256.
    Numeric {
        precision: u8,
        scale: i8,
    },
    /// Anything whose binary form is its UTF-8 text: text, varchar, char(n), name, json,
    /// xml, enums, and every column cast to text on the server.
    Text,
    /// jsonb: a version byte, then the text.
    Jsonb,
    Bytea,
    Date,
    Time,
    Timestamp,
    Timestamptz,
    /// Struct {months: Int32, days: Int32, microseconds: Int64}: lossless, unlike any
    /// Parquet-writable Arrow interval type.
    Interval,
    /// FixedSizeBinary(16) with the `arrow.uuid` extension.
    Uuid,
    /// An array as a list of its elements: lists start at 1 and have one dimension, so a
    /// value with other bounds or more dimensions is an error naming the column
    /// (`--cast col=text` exports such columns, bounds and all).
    Array {
        element: Box<PgKind>,
    },
    /// An array kept verbatim, in Postgres's binary form (dimensions, lower bounds and
    /// elements; the element type as [`PgKind::array_binary`] names it): what a
    /// load-only job streams, so that the target receives every array exactly.
    ArrayBinary {
        element: Box<PgKind>,
    },
}

/// How a verbatim array's bytes are typed: the built-in array type they are a value of,
/// its element type's oid (built-in oids are the same in every database) and the
/// element's receive function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArrayBinary {
    pub array_type: &'static str,
    pub element_oid: u32,
    pub element_recv: &'static str,
}

const fn ab(array_type: &'static str, element_oid: u32, element_recv: &'static str) -> ArrayBinary {
    ArrayBinary {
        array_type,
        element_oid,
        element_recv,
    }
}

#[rustfmt::skip]
const ARRAY_BINARIES: &[ArrayBinary] = &[
    ab("boolean[]", 16, "boolrecv"),
    ab("smallint[]", 21, "int2recv"),
    ab("integer[]", 23, "int4recv"),
    ab("bigint[]", 20, "int8recv"),
    ab("oid[]", 26, "oidrecv"),
    ab("real[]", 700, "float4recv"),
    ab("double precision[]", 701, "float8recv"),
    ab("numeric[]", 1700, "numeric_recv"),
    ab("text[]", 25, "textrecv"),
    ab("jsonb[]", 3802, "jsonb_recv"),
    ab("bytea[]", 17, "bytearecv"),
    ab("date[]", 1082, "date_recv"),
    ab("time without time zone[]", 1083, "time_recv"),
    ab("timestamp without time zone[]", 1114, "timestamp_recv"),
    ab("timestamp with time zone[]", 1184, "timestamptz_recv"),
    ab("interval[]", 1186, "interval_recv"),
    ab("uuid[]", 2950, "uuid_recv"),
];

impl ArrayBinary {
    /// The entry for a `haul.pg_array` field's metadata value.
    pub fn by_type(array_type: &str) -> Option<ArrayBinary> {
        ARRAY_BINARIES
            .iter()
            .find(|a| a.array_type == array_type)
            .copied()
    }
}

/// Microseconds between 1970-01-01 and Postgres's epoch, 2000-01-01.
pub const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;
/// Days between 1970-01-01 and 2000-01-01.
pub const PG_EPOCH_OFFSET_DAYS: i32 = 10_957;

/// How haul holds `infinity` / `-infinity` dates and timestamps in Arrow: the maximum, and
/// its negation (what DuckDB reads as ±infinity; Postgres itself uses the minimum for
/// `-infinity`, which DuckDB takes for a date in 5877642 BC). No finite Postgres date or
/// timestamp comes near either.
pub const DATE_INFINITY: i32 = i32::MAX;
pub const DATE_NEG_INFINITY: i32 = -i32::MAX;
pub const TS_INFINITY: i64 = i64::MAX;
pub const TS_NEG_INFINITY: i64 = -i64::MAX;

impl PgKind {
    pub fn arrow_type(&self) -> DataType {
        match self {
            PgKind::Bool => DataType::Boolean,
            PgKind::Int2 => DataType::Int16,
            PgKind::Int4 => DataType::Int32,
            PgKind::Int8 | PgKind::Oid => DataType::Int64,
            PgKind::Float4 => DataType::Float32,
            PgKind::Float8 => DataType::Float64,
            PgKind::Numeric { precision, scale } if *precision <= 38 => {
                DataType::Decimal128(*precision, *scale)
            }
            PgKind::Numeric { precision, scale } => DataType::Decimal256(*precision, *scale),
            PgKind::Text | PgKind::Jsonb => DataType::Utf8,
            PgKind::Bytea => DataType::Binary,
            PgKind::Date => DataType::Date32,
            PgKind::Time => DataType::Time64(TimeUnit::Microsecond),
            PgKind::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
            PgKind::Timestamptz => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            PgKind::Interval => DataType::Struct(interval_fields()),
            PgKind::Uuid => DataType::FixedSizeBinary(16),
            PgKind::Array { element } => {
                DataType::List(Arc::new(element.arrow_field("element", true)))
            }
            PgKind::ArrayBinary { .. } => DataType::Binary,
        }
    }

    /// For a verbatim array, how its bytes are typed: the element kind's built-in array
    /// type. Text-like elements (varchar, enums, `--cast`s to `text[]`) are UTF-8 text in
    /// binary form, so they are typed `text[]`.
    pub fn array_binary(&self) -> Option<ArrayBinary> {
        let PgKind::ArrayBinary { element } = self else {
            return None;
        };
        let array_type = match **element {
            PgKind::Bool => "boolean[]",
            PgKind::Int2 => "smallint[]",
            PgKind::Int4 => "integer[]",
            PgKind::Int8 => "bigint[]",
            PgKind::Oid => "oid[]",
            PgKind::Float4 => "real[]",
            PgKind::Float8 => "double precision[]",
            PgKind::Numeric { .. } => "numeric[]",
            PgKind::Text => "text[]",
            PgKind::Jsonb => "jsonb[]",
            PgKind::Bytea => "bytea[]",
            PgKind::Date => "date[]",
            PgKind::Time => "time without time zone[]",
            PgKind::Timestamp => "timestamp without time zone[]",
            PgKind::Timestamptz => "timestamp with time zone[]",
            PgKind::Interval => "interval[]",
            PgKind::Uuid => "uuid[]",
            PgKind::Array { .. } | PgKind::ArrayBinary { .. } => return None,
        };
        ArrayBinary::by_type(array_type)
    }

    pub fn arrow_field(&self, name: &str, nullable: bool) -> Field {
        let f = Field::new(name, self.arrow_type(), nullable);
        match self {
            PgKind::Uuid => f.with_extension_type(arrow_schema::extension::Uuid),
            _ => f,
        }
    }
}

pub fn interval_fields() -> Fields {
    Fields::from(vec![
        Field::new("months", DataType::Int32, false),
        Field::new("days", DataType::Int32, false),
        Field::new("microseconds", DataType::Int64, false),
    ])
}

/// How a column appears in the source query's SELECT list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "select", content = "type", rename_all = "snake_case")]
pub enum Select {
    /// The column as it is.
    Column,
    /// `"col"::<type>` (a user's `--cast`, or `text[]` for arrays of text-rendered types).
    Cast(String),
    /// The column's display form, from its type's output function — what `psql` shows.
    /// (`::text` is not always that: `inet::text` appends `/32` to a host address.)
    Display,
    /// `("col"::<array type>)[:]`: a vector that starts at 0 by definition (`int2vector`,
    /// `oidvector`) as an array from 1, which a list holds exactly.
    Slice(String),
}

/// One extracted column.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnInfo {
    pub name: String,
    /// The source type as Postgres formats it (`numeric(12,2)`, `character varying(40)`).
    pub pg_type: String,
    pub not_null: bool,
    pub kind: PgKind,
    pub select: Select,
}

impl ColumnInfo {
    /// The SELECT-list expression for this column.
    pub fn select_expr(&self) -> String {
        let c = quote_ident(&self.name);
        match &self.select {
            Select::Column => c,
            Select::Cast(t) => format!("{c}::{t}"),
            Select::Display => format!("CASE WHEN {c} IS NULL THEN NULL ELSE concat({c}) END"),
            Select::Slice(t) => format!("({c}::{t})[:]"),
        }
    }
}

/// A resolved source table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableInfo {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    /// pg_class.relkind: `r` table, `p` partitioned table, `m` materialized view.
    pub relkind: String,
    pub columns: Vec<ColumnInfo>,
}

impl TableInfo {
    /// `"schema"."name"`, safe to put in SQL.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }

    /// The Arrow schema of the extracted rows, with each column's Postgres type in its
    /// field metadata (`haul.pg_type`) and the source table in the schema metadata.
    pub fn arrow_schema(&self) -> Schema {
        let fields: Vec<Field> = self
            .columns
            .iter()
            .map(|c| {
                let mut f = c.kind.arrow_field(&c.name, !c.not_null);
                let mut md = f.metadata().clone();
                md.insert(String::from("haul.pg_type"), c.pg_type.clone());
                if let Some(a) = c.kind.array_binary() {
                    md.insert(String::from("haul.pg_array"), a.array_type.to_owned());
                }
                f.set_metadata(md);
                f
            })
            .collect();
        let mut md = std::collections::HashMap::new();
        md.insert(
            "haul.source_table".into(),
            format!("{}.{}", self.schema, self.name),
        );
        Schema::new_with_metadata(fields, md)
    }

    /// Streams every array column in Postgres's binary form ([`PgKind::ArrayBinary`])
    /// instead of as a list, which holds neither lower bounds nor dimensions.
    pub fn keep_arrays_verbatim(&mut self) {
        for c in &mut self.columns {
            // (a vector stays a list: it has no bounds or dimensions to keep)
            if let PgKind::Array { element } = &c.kind
                && !matches!(c.select, Select::Slice(_))
            {
                c.kind = PgKind::ArrayBinary {
                    element: element.clone(),
                };
            }
        }
    }

    pub fn column(&self, name: &str) -> Option<&ColumnInfo> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// What readers of the Parquet may get wrong about these columns, one line each
    /// naming the column and the way out: decimals over 38 digits (which DuckDB misreads
    /// without an error) and unconstrained `numeric` (written as text).
    pub fn reader_caveats(&self) -> Vec<String> {
        let mut out = Vec::new();
        for c in &self.columns {
            let name = quote_ident(&c.name);
            match (&c.kind, &c.select) {
                (PgKind::Numeric { precision, scale }, _) if *precision > 38 => out.push(format!(
                    "column {name} ({}) is written as a {precision}-digit decimal, which DuckDB misreads without an error (pyarrow, Spark and delta-rs read it exactly); for DuckDB, export it with --cast {}=text, or --cast {}=numeric(38,{scale}) if its values fit",
                    c.pg_type, c.name, c.name
                )),
                (PgKind::Text, Select::Display) if c.pg_type.starts_with("numeric(") => out.push(format!(
                    "column {name} ({}) has more digits than a Parquet decimal holds (76), so it is written as text",
                    c.pg_type
                )),
                (PgKind::Text, Select::Display) if c.pg_type == "numeric" => out.push(format!(
                    "column {name} is numeric without a precision, so it is written as text (the only form exact for any value); for a decimal column, --cast {}=numeric(p,s) with the precision its values need",
                    c.name
                )),
                _ => {}
            }
        }
        out
    }
}

struct TypeRow {
    typname: String,
    typtype: String,
    basetype: u32,
    typtypmod: i32,
    elem: u32,
    category: String,
}

async fn type_row(client: &Client, oid: u32) -> Result<TypeRow, SourceError> {
    let r = client
        .query_one(
            "SELECT typname::text, typtype::text, typbasetype, typtypmod, typelem, typcategory::text \
             FROM pg_type WHERE oid = $1",
            &[&oid],
        )
        .await
        .map_err(|e| SourceError::query("reading pg_type", e))?;
    Ok(TypeRow {
        typname: r.get(0),
        typtype: r.get(1),
        basetype: r.get(2),
        typtypmod: r.get(3),
        elem: r.get(4),
        category: r.get(5),
    })
}

/// The kind a value of type `oid` (with `typmod`) maps to, and the server-side cast it
/// needs, or `None` if haul has no mapping.
async fn resolve_kind(
    client: &Client,
    mut oid: u32,
    mut typmod: i32,
) -> Result<Option<(PgKind, Select)>, SourceError> {
    // domains: map their base type (a domain can sit on a domain)
    let mut t = type_row(client, oid).await?;
    while t.typtype == "d" {
        if typmod < 0 {
            typmod = t.typtypmod;
        }
        oid = t.basetype;
        t = type_row(client, oid).await?;
    }
    if t.typtype == "e" {
        return Ok(Some((PgKind::Text, Select::Column)));
    }
    // int2vector, oidvector: arrays from 0 by definition, nothing a list cannot hold
    let vector = match oid {
        22 => Some((PgKind::Int2, "smallint[]")),
        30 => Some((PgKind::Oid, "oid[]")),
        _ => None,
    };
    if let Some((element, array)) = vector {
        return Ok(Some((
            PgKind::Array {
                element: Box::new(element),
            },
            Select::Slice(array.into()),
        )));
    }
    if t.category == "A" && t.elem != 0 {
        let Some((element, elem_cast)) = Box::pin(resolve_kind(client, t.elem, typmod)).await?
        else {
            return Ok(None);
        };
        if matches!(element, PgKind::Array { .. }) {
            return Ok(None);
        }
        // arrays of text-rendered types: `text[]` (element-wise `::text`)
        let cast = match elem_cast {
            Select::Column => Select::Column,
            _ => Select::Cast("text[]".into()),
        };
        return Ok(Some((
            PgKind::Array {
                element: Box::new(element),
            },
            cast,
        )));
    }
    let text = Select::Display;
    let kind = match oid {
        16 => PgKind::Bool,
        21 => PgKind::Int2,
        23 => PgKind::Int4,
        20 => PgKind::Int8,
        26 => PgKind::Oid,
        700 => PgKind::Float4,
        701 => PgKind::Float8,
        1700 => {
            if typmod < 4 {
                // unconstrained numeric: any precision and scale, NaN and ±Infinity;
                // only its text form is lossless
                return Ok(Some((PgKind::Text, text)));
            }
            let precision = ((typmod - 4) >> 16) & 0xffff;
            // scale is an 11-bit signed field (negative scales exist since Postgres 15)
            let raw = (typmod - 4) & 0x7ff;
            let scale = if raw & 0x400 != 0 { raw - 0x800 } else { raw };
            let (precision, scale) = decimal_for(precision, scale);
            if precision > 76 {
                return Ok(Some((PgKind::Text, text)));
            }
            PgKind::Numeric {
                precision: precision as u8,
                scale: scale as i8,
            }
        }
        25 | 1043 | 1042 | 19 | 114 | 142 => PgKind::Text,
        3802 => PgKind::Jsonb,
        17 => PgKind::Bytea,
        1082 => PgKind::Date,
        1083 => PgKind::Time,
        1114 => PgKind::Timestamp,
        1184 => PgKind::Timestamptz,
        1186 => PgKind::Interval,
        2950 => PgKind::Uuid,
        // exported in the server's text form: "char", timetz, inet, cidr, macaddr,
        // macaddr8, money, bit, varbit, pg_lsn, tsvector, tsquery
        18 | 1266 | 869 | 650 | 829 | 774 | 790 | 1560 | 1562 | 3220 | 3614 | 3615 => {
            return Ok(Some((PgKind::Text, text)));
        }
        _ => {
            // extension types that are text at heart (citext)
            if t.typname == "citext" {
                return Ok(Some((PgKind::Text, text)));
            }
            return Ok(None);
        }
    };
    Ok(Some((kind, Select::Column)))
}

/// The decimal (precision, scale) that holds every value of `numeric(precision, scale)`
/// exactly, with 0 ≤ scale ≤ precision as Arrow and Parquet require: a negative scale
/// (`numeric(5,-2)`: integers, multiples of 100, below 10^7) is a scale-0 decimal of the
/// wider precision; a scale above the precision (`numeric(3,5)`: |v| < 0.01, five
/// fractional digits) a decimal whose precision is the scale.
fn decimal_for(precision: i32, scale: i32) -> (i32, i32) {
    if scale < 0 {
        (precision - scale, 0)
    } else {
        (precision.max(scale), scale)
    }
}

/// Resolves the user's table name (quoting allowed, search_path applies) and its columns.
pub async fn resolve_table(
    client: &Client,
    table: &str,
    columns: &[String],
    casts: &BTreeMap<String, String>,
) -> Result<TableInfo, SourceError> {
    let row = client
        .query_opt(
            "SELECT c.oid, n.nspname::text, c.relname::text, c.relkind::text, \
                    has_table_privilege(c.oid, 'SELECT') \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.oid = to_regclass($1)",
            &[&table],
        )
        .await
        .map_err(|e| match e.code() {
            // to_regclass checks USAGE on a schema it is given (`permission denied for
            // schema s`): the table may well exist
            Some(c) if c.code() == "42501" => SourceError::SchemaPermissionDenied {
                reason: pg_reason(&e),
            },
            Some(c) if c.code().starts_with("42") || c.code().starts_with("22") => {
                SourceError::TableNotFound {
                    table: table.to_owned(),
                }
            }
            _ => SourceError::query("resolving the table", e),
        })?
        .ok_or_else(|| SourceError::TableNotFound {
            table: table.to_owned(),
        })?;
    let (oid, schema, name, relkind, can_select): (u32, String, String, String, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    let display = format!("{}.{}", quote_ident(&schema), quote_ident(&name));
    if !matches!(relkind.as_str(), "r" | "p" | "m") {
        let kind = match relkind.as_str() {
            "v" => "view",
            "i" | "I" => "index",
            "S" => "sequence",
            "f" => "foreign table",
            "c" => "composite type",
            _ => "relation",
        };
        return Err(SourceError::NotATable {
            relation: display,
            kind: kind.into(),
        });
    }
    let rows = client
        .query(
            "SELECT a.attname::text, a.atttypid, a.atttypmod, a.attnotnull, \
                    format_type(a.atttypid, a.atttypmod), \
                    has_column_privilege(a.attrelid, a.attnum, 'SELECT') \
             FROM pg_attribute a \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&oid],
        )
        .await
        .map_err(|e| SourceError::query("reading the table's columns", e))?;
    let all: Vec<(String, u32, i32, bool, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    for c in columns.iter().chain(casts.keys()) {
        if !all.iter().any(|a| &a.0 == c) {
            return Err(SourceError::ColumnNotFound {
                table: display.clone(),
                column: c.clone(),
            });
        }
    }
    if !can_select {
        // column-level grants are enough for the columns actually read
        let unreadable: Vec<String> = rows
            .iter()
            .filter(|r| !r.get::<_, bool>(5))
            .map(|r| r.get::<_, String>(0))
            .filter(|c| columns.is_empty() || columns.contains(c))
            .collect();
        if unreadable.len() == rows.len() {
            return Err(SourceError::PermissionDenied { table: display });
        }
        if !unreadable.is_empty() {
            return Err(SourceError::ColumnsNotReadable {
                table: display,
                columns: unreadable
                    .iter()
                    .map(|c| quote_ident(c))
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
    }
    let mut out = Vec::new();
    let mut unsupported = Vec::new();
    for (col, type_oid, typmod, not_null, pg_type) in all {
        if !columns.is_empty() && !columns.contains(&col) {
            continue;
        }
        let resolved = match casts.get(&col) {
            Some(target) => {
                let target_oid: Option<u32> = client
                    .query_one("SELECT to_regtype($1)::oid", &[target])
                    .await
                    .map_err(|e| SourceError::BadCast {
                        column: col.clone(),
                        target: target.clone(),
                        reason: pg_reason(&e),
                    })?
                    .get(0);
                let target_oid = target_oid.ok_or_else(|| SourceError::BadCast {
                    column: col.clone(),
                    target: target.clone(),
                    reason: "no such type".into(),
                })?;
                let formatted: String = client
                    .query_one("SELECT format_type($1, NULL)", &[&target_oid])
                    .await
                    .map_err(|e| SourceError::query("formatting a cast type", e))?
                    .get(0);
                let (kind, extra) =
                    resolve_kind(client, target_oid, -1).await?.ok_or_else(|| {
                        SourceError::BadCast {
                            column: col.clone(),
                            target: target.clone(),
                            reason: "haul cannot map that type either; use text".into(),
                        }
                    })?;
                // a cast to e.g. inet still needs the text rendering on top
                let cast = match extra {
                    Select::Column => formatted,
                    _ => format!("{formatted}::text"),
                };
                (kind, Select::Cast(cast))
            }
            None => match resolve_kind(client, type_oid, typmod).await? {
                Some(resolved) => resolved,
                None => {
                    unsupported.push((col, pg_type));
                    continue;
                }
            },
        };
        out.push(ColumnInfo {
            name: col,
            pg_type,
            not_null,
            kind: resolved.0,
            select: resolved.1,
        });
    }
    if !unsupported.is_empty() {
        return Err(SourceError::UnsupportedTypes {
            columns: unsupported,
        });
    }
    Ok(TableInfo {
        oid,
        schema,
        name,
        relkind,
        columns: out,
    })
}

#[cfg(test)]
mod tests {

    #[test]
    fn every_numeric_typmod_has_an_exact_decimal() {
        use super::decimal_for;
        assert_eq!(decimal_for(12, 2), (12, 2));
        assert_eq!(decimal_for(5, -2), (7, 0));
        assert_eq!(decimal_for(3, 5), (5, 5));
        assert_eq!(decimal_for(1, -1000), (1001, 0)); // beyond Decimal256: text
    }

    use super::*;

    #[test]
    fn unmappable_columns_are_named_together_with_their_casts() {
        let one = SourceError::UnsupportedTypes {
            columns: vec![("r".into(), "int4range".into())],
        };
        assert_eq!(
            one.to_string(),
            "column \"r\" has type int4range, which haul cannot map to Arrow; pass --cast r=text to export its text form"
        );
        let two = SourceError::UnsupportedTypes {
            columns: vec![
                ("r".into(), "int4range".into()),
                ("it's odd".into(), "pair".into()),
            ],
        };
        assert_eq!(
            two.to_string(),
            "columns \"r\" (int4range), \"it's odd\" (pair) have types haul cannot map to Arrow; pass --cast r=text --cast 'it'\\''s odd=text' to export their text form"
        );
    }

    #[test]
    fn secrets_print_masked() {
        for s in ["postgres://u:pw@h/d", "host=h password='pw x'", "pw"] {
            let s = Secret::new(s);
            assert!(!format!("{s:?} {s}").contains("pw"), "{s}");
        }
    }

    #[test]
    fn recovery_conflicts_on_a_standby_are_retried() {
        // "canceling statement due to conflict with recovery", and the snapshot-too-old
        // and lock-timeout kinds of it a standby reports
        for code in ["40001", "40P01", "57014"] {
            assert_eq!(sqlstate_class(code), ErrorClass::Transient, "{code}");
        }
    }

    #[test]
    fn quotes_identifiers_and_literals() {
        assert_eq!(quote_ident(r#"My "odd" Table"#), r#""My ""odd"" Table""#);
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
