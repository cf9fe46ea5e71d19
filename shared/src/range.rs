//! Which rows of a table belong to one chunk.

use serde::{Deserialize, Serialize};

use crate::pg::{quote_ident, quote_literal};

/// A column the table is split on, with its type as written in casts (`bigint`,
/// `character varying(20)`), and how the source orders it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyColumn {
    pub name: String,
    pub pg_type: String,
    /// How the source compares the column's values, which decides whether a key range
    /// means the same rows in another database (a loader's target).
    #[serde(default)]
    pub ordering: KeyOrdering,
}

/// How the source compares a key column's values.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyOrdering {
    /// Not known (a plan from before haul recorded it).
    #[default]
    Unknown,
    /// A built-in type without a collation (integers, numeric, timestamps, uuid, bytea):
    /// the same order in every database.
    Natural,
    /// Text under the `C` (or `POSIX`) collation: byte order, which `COLLATE "C"` gives
    /// in any database.
    Bytes,
    /// Under the named collation (or a type whose order is the database's own: an enum, a
    /// composite, a domain), which another database may not share.
    Collation(String),
}

/// A chunk's rows. Key ranges are half-open `[lower, upper)` on the key tuple compared as
/// a Postgres row value; a missing bound is unbounded. Key values are held in their
/// Postgres text form and cast back to the key column's type in the query, so every
/// orderable type (integers, uuid, text, timestamps, composites) round-trips exactly.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ChunkRange {
    /// The whole table in one chunk.
    All,
    /// `lower <= key < upper`. Never matches a row with a NULL key column.
    Key {
        lower: Option<Vec<String>>,
        upper: Option<Vec<String>>,
    },
    /// Rows with a NULL in any key column (which no key range matches).
    NullKeys,
    /// Heap pages `[first_page, end_page)`; `end_page: None` is unbounded. Only valid
    /// within the snapshot the pages were counted in.
    Ctid {
        first_page: u64,
        end_page: Option<u64>,
    },
}

impl ChunkRange {
    /// Whether this range stays meaningful under a different snapshot (ctid ranges do not:
    /// an update moves a row to another page).
    pub fn survives_new_snapshot(&self) -> bool {
        !matches!(self, ChunkRange::Ctid { .. })
    }

    /// The `WHERE` predicate of a chunk. Key bounds are quoted literals cast to the key
    /// column's type; identifiers are quoted.
    pub fn predicate(&self, key: &[KeyColumn]) -> String {
        let cols: Vec<String> = key.iter().map(|k| quote_ident(&k.name)).collect();
        self.predicate_on(key, &cols)
    }

    /// [`predicate`](Self::predicate) comparing the expressions `cols` (one per key
    /// column, e.g. `"k" COLLATE "C"`) instead of the bare columns.
    pub fn predicate_on(&self, key: &[KeyColumn], cols: &[String]) -> String {
        let tuple = |vals: &[String]| -> String {
            let lits: Vec<String> = vals
                .iter()
                .zip(key)
                .map(|(v, k)| format!("{}::{}", quote_literal(v), k.pg_type))
                .collect();
            if lits.len() == 1 {
                lits[0].clone()
            } else {
                format!("ROW({})", lits.join(", "))
            }
        };
        let tuple_of_cols = || {
            if cols.len() == 1 {
                cols[0].clone()
            } else {
                format!("ROW({})", cols.join(", "))
            }
        };
        match self {
            ChunkRange::All => "true".into(),
            ChunkRange::NullKeys => {
                let c: Vec<String> = cols.iter().map(|c| format!("{c} IS NULL")).collect();
                format!("({})", c.join(" OR "))
            }
            ChunkRange::Key { lower, upper } => {
                let mut parts = Vec::new();
                if let Some(l) = lower {
                    parts.push(format!("{} >= {}", tuple_of_cols(), tuple(l)));
                }
                if let Some(u) = upper {
                    parts.push(format!("{} < {}", tuple_of_cols(), tuple(u)));
                }
                // A key range never matches a row with a NULL key column: those rows are
                // the NULL-key chunk's. A single column compared to a bound is NULL (not
                // true) for them, but a row comparison decides at the first unequal pair,
                // so `ROW(5, NULL) >= ROW(4, 7)` is true: composite keys (and ranges
                // unbounded on both sides) say so explicitly.
                if parts.is_empty() || key.len() > 1 {
                    parts.extend(cols.iter().map(|c| format!("{c} IS NOT NULL")));
                }
                parts.join(" AND ")
            }
            ChunkRange::Ctid {
                first_page,
                end_page,
            } => {
                let mut p = format!("ctid >= '({first_page},0)'::tid");
                if let Some(e) = end_page {
                    p.push_str(&format!(" AND ctid < '({e},0)'::tid"));
                }
                p
            }
        }
    }
}
