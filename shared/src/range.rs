//! Which rows of a table belong to one chunk.

use serde::{Deserialize, Serialize};

use crate::pg::{quote_ident, quote_literal};

/// A column the table is split on, with its type as written in casts (`bigint`,
/// `character varying(20)`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyColumn {
    pub name: String,
    pub pg_type: String,
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
        let cols = || {
            let c: Vec<String> = key.iter().map(|k| quote_ident(&k.name)).collect();
            if c.len() == 1 {
                c[0].clone()
            } else {
                format!("ROW({})", c.join(", "))
            }
        };
        match self {
            ChunkRange::All => "true".into(),
            ChunkRange::NullKeys => {
                let c: Vec<String> = key
                    .iter()
                    .map(|k| format!("{} IS NULL", quote_ident(&k.name)))
                    .collect();
                format!("({})", c.join(" OR "))
            }
            ChunkRange::Key { lower, upper } => {
                let mut parts = Vec::new();
                if let Some(l) = lower {
                    parts.push(format!("{} >= {}", cols(), tuple(l)));
                }
                if let Some(u) = upper {
                    parts.push(format!("{} < {}", cols(), tuple(u)));
                }
                // A key range never matches a row with a NULL key column: those rows are
                // the NULL-key chunk's. A single column compared to a bound is NULL (not
                // true) for them, but a row comparison decides at the first unequal pair,
                // so `ROW(5, NULL) >= ROW(4, 7)` is true: composite keys (and ranges
                // unbounded on both sides) say so explicitly.
                if parts.is_empty() || key.len() > 1 {
                    parts.extend(
                        key.iter()
                            .map(|k| format!("{} IS NOT NULL", quote_ident(&k.name))),
                    );
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
