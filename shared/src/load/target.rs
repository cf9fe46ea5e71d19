//! The target table: its columns read from the catalog, the plan that maps each stream
//! column onto one, and the DDL of `--create-table` (the source's types where the target
//! knows them).

use crate::pg::{self, quote_ident};
use crate::range::{ChunkRange, KeyColumn, KeyOrdering};
use arrow_schema::{DataType, Field, Schema, TimeUnit};
use tokio_postgres::Client;

use super::encode::{ColumnPlan, TargetColumn};
use super::error::LoadError;

/// A resolved target table.
pub(super) struct Target {
    pub(super) oid: u32,
    pub(super) quoted: String,
    pub(super) columns: Vec<TargetColumn>,
}

pub(super) fn target_column<'a>(t: &'a Target, name: &str) -> Option<&'a TargetColumn> {
    t.columns.iter().find(|c| c.name == name)
}

/// Matches every stream column with a target column; one error lists every problem.
pub(super) fn plan_columns(target: &Target, schema: &Schema) -> Result<Vec<ColumnPlan>, LoadError> {
    let mut plans = Vec::new();
    let mut problems = Vec::new();
    for f in schema.fields() {
        match target_column(target, f.name()) {
            None => problems.push(format!("no column {:?}", f.name())),
            Some(t) => match super::encode::plan_column(f, t) {
                Ok(p) => plans.push(p),
                Err(e) => problems.push(format!("column {:?}: {e}", f.name())),
            },
        }
    }
    if problems.is_empty() {
        Ok(plans)
    } else {
        Err(LoadError::Mismatch {
            table: target.quoted.clone(),
            problems: problems.join("; "),
        })
    }
}

/// The rows of a chunk's key range in the target, as a predicate over the target's
/// columns, when the target orders the key as the source does (each key column of the
/// same type, and either a built-in type without a collation or text the source compared
/// in byte order, compared here under `COLLATE "C"`); `None` otherwise, or when the chunk
/// is not a key range. Nothing of the request but quoted literals and identifiers reaches
/// the predicate: the types cast to are the target's own, from its catalog.
pub(super) fn range_in_target(
    target: &Target,
    range: &ChunkRange,
    key: &[KeyColumn],
) -> Result<Option<String>, LoadError> {
    if !matches!(range, ChunkRange::Key { .. }) {
        return Ok(None);
    }
    let mut cols = Vec::new();
    let mut typed = Vec::new();
    for k in key {
        let col = target_column(target, &k.name).ok_or_else(|| {
            LoadError::BadRequest(format!(
                "key column {:?} is not a column of {}",
                k.name, target.quoted
            ))
        })?;
        let expr = match (&k.ordering, col.collatable) {
            _ if col.pg_type != k.pg_type => return Ok(None),
            (KeyOrdering::Natural, false) => quote_ident(&col.name),
            (KeyOrdering::Bytes, true) => format!("{} COLLATE \"C\"", quote_ident(&col.name)),
            _ => return Ok(None),
        };
        cols.push(expr);
        typed.push(KeyColumn {
            name: col.name.clone(),
            pg_type: col.pg_type.clone(),
            ordering: k.ordering.clone(),
        });
    }
    Ok(Some(range.predicate_on(&typed, &cols)))
}

const TARGET_COLUMNS_SQL: &str = "\
    SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull, \
           bt.typreceive::text, et.oid, ebt.typreceive::text, a.attcollation <> 0 \
    FROM pg_attribute a \
    JOIN pg_type t ON t.oid = a.atttypid \
    JOIN pg_type bt ON bt.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END \
    LEFT JOIN pg_type et ON et.oid = bt.typelem AND bt.typcategory = 'A' \
    LEFT JOIN pg_type ebt ON ebt.oid = CASE WHEN et.typtype = 'd' THEN et.typbasetype ELSE et.oid END \
    WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped \
    ORDER BY a.attnum";

/// The target table and its columns, or `None` when it does not exist.
pub(super) async fn resolve_target(c: &Client, table: &str) -> Result<Option<Target>, LoadError> {
    let row = c
        .query_opt(
            "SELECT c.oid, quote_ident(n.nspname) || '.' || quote_ident(c.relname) \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.oid = to_regclass($1) AND c.relkind IN ('r', 'p')",
            &[&table],
        )
        .await
        .map_err(|e| match e.code() {
            Some(code) if code.code().starts_with("42") || code.code().starts_with("22") => {
                LoadError::BadRequest(format!("target table {table:?}: {}", pg::pg_reason(&e)))
            }
            _ => LoadError::query("resolving the target table", e),
        })?;
    let Some(row) = row else { return Ok(None) };
    let oid: u32 = row.get(0);
    let rows = c
        .query(TARGET_COLUMNS_SQL, &[&oid])
        .await
        .map_err(|e| LoadError::query("reading the target's columns", e))?;
    let columns = rows
        .iter()
        .map(|r| TargetColumn {
            name: r.get(0),
            pg_type: r.get(1),
            not_null: r.get(2),
            recv: r.get(3),
            element: r
                .get::<_, Option<u32>>(4)
                .map(|oid| (oid, r.get::<_, Option<String>>(5).unwrap_or_default())),
            collatable: r.get(6),
        })
        .collect();
    Ok(Some(Target {
        oid,
        quoted: row.get(1),
        columns,
    }))
}

/// The Postgres type haul creates for an Arrow type when the source's type is not
/// available in the target.
fn pg_type_for(dt: &DataType) -> Option<String> {
    Some(match dt {
        DataType::Boolean => "boolean".into(),
        DataType::Int16 => "smallint".into(),
        DataType::Int32 => "integer".into(),
        DataType::Int64 => "bigint".into(),
        DataType::Float32 => "real".into(),
        DataType::Float64 => "double precision".into(),
        DataType::Decimal128(p, s) | DataType::Decimal256(p, s) => format!("numeric({p},{s})"),
        DataType::Utf8 => "text".into(),
        DataType::Binary => "bytea".into(),
        DataType::Date32 => "date".into(),
        DataType::Time64(TimeUnit::Microsecond) => "time".into(),
        DataType::Timestamp(TimeUnit::Microsecond, None) => "timestamp".into(),
        DataType::Timestamp(TimeUnit::Microsecond, Some(_)) => "timestamptz".into(),
        DataType::Struct(f) if f == &crate::pg::interval_fields() => "interval".into(),
        DataType::FixedSizeBinary(16) => "uuid".into(),
        DataType::List(e) => format!("{}[]", pg_type_for(e.data_type())?),
        _ => return None,
    })
}

/// Creates the target table (and its schema, if missing): each column gets the source's type (from the field's
/// `haul.pg_type` metadata) when the target knows that type and it can take the stream's
/// values, otherwise the type of its Arrow mapping.
pub(super) async fn create_table(
    c: &Client,
    table: &str,
    schema: &Schema,
) -> Result<(), LoadError> {
    let parts: Vec<String> = c
        .query_one("SELECT parse_ident($1)", &[&table])
        .await
        .map_err(|e| {
            LoadError::BadRequest(format!("target table {table:?}: {}", pg::pg_reason(&e)))
        })?
        .get(0);
    let quoted = match parts.as_slice() {
        [name] => quote_ident(name),
        [schema, name] => format!("{}.{}", quote_ident(schema), quote_ident(name)),
        _ => {
            return Err(LoadError::BadRequest(format!(
                "target table {table:?}: expected schema.table"
            )));
        }
    };
    let mut defs = Vec::new();
    for f in schema.fields() {
        let ty = source_type_if_usable(c, f).await?;
        let ty = match ty.or_else(|| f.metadata().get("haul.pg_array").cloned()) {
            Some(t) => t,
            None => pg_type_for(f.data_type()).ok_or_else(|| LoadError::Mismatch {
                table: quoted.clone(),
                problems: format!(
                    "no Postgres type for column {:?} ({})",
                    f.name(),
                    f.data_type()
                ),
            })?,
        };
        let not_null = if f.is_nullable() { "" } else { " NOT NULL" };
        defs.push(format!("{} {ty}{not_null}", quote_ident(f.name())));
    }
    if let [schema, _] = parts.as_slice() {
        // `--create-table` into a schema that does not exist yet creates it too
        c.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {}",
            quote_ident(schema)
        ))
        .await
        .map_err(|e| LoadError::query("creating the target table's schema", e))?;
    }
    c.batch_execute(&format!("CREATE TABLE {quoted} ({})", defs.join(", ")))
        .await
        .map_err(|e| LoadError::query("creating the target table", e))?;
    tracing::info!(table = %quoted, "created the target table");
    Ok(())
}

async fn source_type_if_usable(c: &Client, f: &Field) -> Result<Option<String>, LoadError> {
    let Some(pg_type) = f.metadata().get("haul.pg_type") else {
        return Ok(None);
    };
    // to_regtype errors on syntax it cannot parse; treat that as unknown too
    let row = c
        .query_opt(
            "SELECT format_type(t.oid, NULL), bt.typreceive::text, et.oid, ebt.typreceive::text \
             FROM pg_type t \
             JOIN pg_type bt ON bt.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END \
             LEFT JOIN pg_type et ON et.oid = bt.typelem AND bt.typcategory = 'A' \
             LEFT JOIN pg_type ebt ON ebt.oid = CASE WHEN et.typtype = 'd' THEN et.typbasetype ELSE et.oid END \
             WHERE t.oid = to_regtype($1)",
            &[pg_type],
        )
        .await
        .ok()
        .flatten();
    let Some(row) = row else { return Ok(None) };
    let candidate = TargetColumn {
        name: f.name().clone(),
        pg_type: pg_type.clone(),
        recv: row.get(1),
        element: row
            .get::<_, Option<u32>>(2)
            .map(|oid| (oid, row.get::<_, Option<String>>(3).unwrap_or_default())),
        not_null: !f.is_nullable(),
        collatable: false,
    };
    Ok(super::encode::plan_column(f, &candidate)
        .ok()
        .map(|_| pg_type.clone()))
}
