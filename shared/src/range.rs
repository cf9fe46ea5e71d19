//! Which rows of a table belong to one chunk.

use serde::{Deserialize, Serialize};

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
}
