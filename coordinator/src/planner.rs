//! Cuts a table into chunks of about `chunk_rows` rows each, balanced by rows, not by key
//! width: boundaries are quantiles of the key (`ntile` over the table, or over a
//! `TABLESAMPLE SYSTEM` sample of big tables), so sparse and skewed keys, uuids, text
//! and composite keys all split evenly. Tables without a usable key split into heap page
//! (ctid) ranges. Every query here runs in the job's snapshot.
//!
//! Ranges are half-open, cover the whole key space and never overlap; rows with a NULL
//! key column get their own chunk.
//!
//! Chunk sizes shrink towards the end of the key space (guided scheduling, see
//! [`chunk_tiles`]): workers take chunks in order, so the last ones to start are small and
//! the workers finish together instead of one reading a full chunk while the others idle.

use haul_shared::ChunkRange;
use haul_shared::jobs::{KeyColumn, Split};
use haul_shared::pg::{SourceError, TableInfo, pg_reason, quote_ident};
use haul_shared::range::KeyOrdering;
use tokio_postgres::Client;

/// Tables up to this many (estimated) rows get exact quantiles from a full key scan;
/// bigger ones sample pages (a full sort of 1M keys already costs ~0.5 s).
const FULL_SCAN_ROWS: u64 = 100_000;
/// Sampled keys wanted per full-size chunk on big tables.
const SAMPLE_PER_CHUNK: u64 = 200;
const MIN_SAMPLE: u64 = 50_000;
/// Chunks are never cut smaller than this to reach `min_chunks` or to shrink the tail.
const MIN_CHUNK_ROWS: u64 = 10_000;
/// Tiles per full-size chunk: the finest unit the tail's chunks are cut to.
const TILES_PER_CHUNK: u64 = 8;

#[derive(Clone, Debug)]
pub struct Planned {
    pub key: Vec<KeyColumn>,
    pub chunks: Vec<ChunkRange>,
    pub estimated_rows: u64,
}

struct KeyCol {
    col: KeyColumn,
    nullable: bool,
}

/// Plans chunks of at most about `chunk_rows` rows for `workers` parallel readers: at
/// least two chunks per worker when the table holds enough rows for chunks of
/// [`MIN_CHUNK_ROWS`], and a tail of shrinking chunks.
pub async fn plan(
    client: &Client,
    table: &TableInfo,
    key_override: &[String],
    chunk_rows: u64,
    workers: u64,
    split: Split,
    filter: Option<&str>,
) -> Result<Planned, SourceError> {
    let key = match split {
        Split::Ctid if table.relkind != "p" => None,
        _ => choose_key(client, table, key_override).await?,
    };
    let estimated_rows = match filter {
        // an incremental window: its rows are what the chunks divide (counted exactly;
        // an index on the watermark column makes this cheap)
        Some(f) => {
            let n: i64 = client
                .query_one(
                    &format!("SELECT count(*) FROM {} WHERE {f}", table.quoted()),
                    &[],
                )
                .await
                .map_err(|e| SourceError::query("counting the rows in the window", e))?
                .get(0);
            n.max(0) as u64
        }
        None => estimate_rows(client, table).await?,
    };
    let (tiles, sizes) = tile_plan(estimated_rows, chunk_rows, workers);
    let n = sizes.len();
    let cuts = tile_cuts(&sizes);
    let key_cols: Vec<KeyColumn> = key.iter().flatten().map(|k| k.col.clone()).collect();
    let any_nullable = key.iter().flatten().any(|k| k.nullable);
    let mut chunks = match &key {
        _ if n == 1 => vec![ChunkRange::All],
        Some(key) => {
            let bounds = boundaries(client, table, key, tiles, estimated_rows, filter).await?;
            split_bounds(pick_bounds(bounds, &cuts, tiles))
        }
        None => {
            if table.relkind == "p" {
                return Err(SourceError::NoKey {
                    table: table.quoted(),
                });
            }
            let pages: i64 = client
                .query_one(
                    "SELECT pg_relation_size($1::oid::regclass) / current_setting('block_size')::int8",
                    &[&table.oid],
                )
                .await
                .map_err(|e| SourceError::query("measuring the table", e))?
                .get(0);
            ctid_ranges(pages.max(0) as u64, &cuts, tiles)
        }
    };
    if any_nullable && !matches!(chunks[..], [ChunkRange::All]) {
        chunks.push(ChunkRange::NullKeys);
    }
    Ok(Planned {
        key: if matches!(chunks[..], [ChunkRange::All]) {
            Vec::new()
        } else {
            key_cols
        },
        chunks,
        estimated_rows,
    })
}

/// How many chunks a table of `rows` rows is cut into.
pub fn chunk_count(rows: u64, chunk_rows: u64, min_chunks: u64) -> u64 {
    let by_size = rows.div_ceil(chunk_rows.max(1));
    by_size.max(min_chunks.min(rows / MIN_CHUNK_ROWS)).max(1)
}

/// How a table of `rows` rows is cut for `workers` readers: into how many tiles of equal
/// rows, and the chunks' sizes in tiles, in key order (see [`chunk_tiles`]).
pub fn tile_plan(rows: u64, chunk_rows: u64, workers: u64) -> (u64, Vec<u64>) {
    let workers = workers.max(1);
    let tiles = chunk_count(rows, chunk_rows, 2 * workers) * TILES_PER_CHUNK;
    let min_tiles = MIN_CHUNK_ROWS
        .saturating_mul(tiles)
        .div_ceil(rows.max(1))
        .clamp(1, TILES_PER_CHUNK);
    (
        tiles,
        chunk_tiles(tiles, TILES_PER_CHUNK, min_tiles, workers),
    )
}

/// Chunk sizes in tiles, in the order workers take them: full chunks of `full` tiles
/// while there is plenty of work, then each chunk a share of what is left
/// (`left / (2 * workers)`, at least `min`), so that the chunks started last are small
/// and no worker starts a full chunk while the others run out of work. Sums to `tiles`.
pub fn chunk_tiles(tiles: u64, full: u64, min: u64, workers: u64) -> Vec<u64> {
    let (full, min) = (full.max(1), min.clamp(1, full.max(1)));
    let mut out = Vec::new();
    let mut left = tiles;
    while left > 0 {
        let size = left.div_ceil(2 * workers.max(1)).clamp(min, full).min(left);
        out.push(size);
        left -= size;
    }
    // a last piece below the minimum joins the one before it
    if out.len() > 1 && out[out.len() - 1] < min {
        let last = out.pop().expect("two pieces");
        *out.last_mut().expect("one piece") += last;
    }
    out
}

/// The tile indices where chunks end, but for the last (which ends at the table's end).
fn tile_cuts(sizes: &[u64]) -> Vec<u64> {
    let mut at = 0;
    let mut cuts: Vec<u64> = sizes
        .iter()
        .map(|s| {
            at += s;
            at
        })
        .collect();
    cuts.pop();
    cuts
}

/// The boundaries at the tile cuts: `bounds[i]` starts tile `i + 1` of `tiles` (a small
/// sample may have found fewer tiles: cuts then scale to what it found).
fn pick_bounds(bounds: Vec<Vec<String>>, cuts: &[u64], tiles: u64) -> Vec<Vec<String>> {
    let found = bounds.len() as u64 + 1;
    let mut picked: Vec<Vec<String>> = Vec::with_capacity(cuts.len());
    let mut last = None;
    for c in cuts {
        let i = (c * found).div_ceil(tiles.max(1)).clamp(1, found) - 1;
        if i as usize >= bounds.len() || last == Some(i) {
            continue;
        }
        last = Some(i);
        picked.push(bounds[i as usize].clone());
    }
    picked
}

/// Ranges between consecutive boundaries: `(-inf, b0), [b0, b1), ..., [bn, +inf)`.
pub fn split_bounds(bounds: Vec<Vec<String>>) -> Vec<ChunkRange> {
    let mut out = Vec::with_capacity(bounds.len() + 1);
    let mut lower: Option<Vec<String>> = None;
    for b in bounds {
        if lower.as_ref() == Some(&b) {
            continue;
        }
        out.push(ChunkRange::Key {
            lower: lower.take(),
            upper: Some(b.clone()),
        });
        lower = Some(b);
    }
    out.push(ChunkRange::Key { lower, upper: None });
    out
}

/// Page ranges over `[0, pages)` cut at `cuts` (tile indices of `tiles` equal tiles), the
/// last unbounded (pages added later hold only rows the snapshot cannot see, but an
/// unbounded end costs nothing and is safe).
pub fn ctid_ranges(pages: u64, cuts: &[u64], tiles: u64) -> Vec<ChunkRange> {
    let mut starts: Vec<u64> = cuts
        .iter()
        .map(|c| pages * c / tiles.max(1))
        .filter(|&p| p > 0 && p < pages)
        .collect();
    starts.dedup();
    if starts.is_empty() {
        return vec![ChunkRange::All];
    }
    starts.insert(0, 0);
    (0..starts.len())
        .map(|i| ChunkRange::Ctid {
            first_page: starts[i],
            end_page: starts.get(i + 1).copied(),
        })
        .collect()
}

/// Pages of the table [`estimate_rows`] reads at least to check the statistics (all of a
/// table this small or smaller: its count is then exact).
const CHECK_PAGES: i64 = 1000;

/// The table's rows, as the statistics have them (reltuples scaled to the current size,
/// as Postgres's own planner does; summed over leaf partitions), checked against a count
/// of a page sample of at least [`CHECK_PAGES`] pages in the snapshot: statistics can be
/// far off (analyzed at 10 rows, then 500k inserted), and chunk sizes, so memory and
/// balance, depend on this. The sample's figure wins when the two differ by more than 2×.
async fn estimate_rows(client: &Client, table: &TableInfo) -> Result<u64, SourceError> {
    let sql = "WITH rels AS ( \
                 SELECT $1::oid AS oid WHERE NOT EXISTS (SELECT 1 FROM pg_class WHERE oid = $1 AND relkind = 'p') \
                 UNION ALL SELECT relid FROM pg_partition_tree($1) WHERE isleaf AND relid <> $1 ) \
               SELECT coalesce(sum(CASE WHEN c.reltuples > 0 AND c.relpages > 0 \
                        THEN c.reltuples / c.relpages * greatest(pg_relation_size(c.oid) / current_setting('block_size')::int8, 1) \
                        ELSE 0 END), 0)::float8, \
                      coalesce(sum(pg_relation_size(c.oid) / current_setting('block_size')::int8), 0)::int8 \
               FROM rels JOIN pg_class c ON c.oid = rels.oid";
    let row = client
        .query_one(sql, &[&table.oid])
        .await
        .map_err(|e| SourceError::query("estimating the table's rows", e))?;
    let (stats, pages): (f64, i64) = (row.get(0), row.get(1));
    if pages <= CHECK_PAGES {
        // small enough to count, exactly, in the snapshot
        let n: i64 = client
            .query_one(&format!("SELECT count(*) FROM {}", table.quoted()), &[])
            .await
            .map_err(|e| SourceError::query("counting the table's rows", e))?
            .get(0);
        return Ok(n.max(0) as u64);
    }
    let pct = CHECK_PAGES as f64 * 100.0 / pages as f64;
    let sampled: i64 = client
        .query_one(
            &format!(
                "SELECT count(*) FROM {} TABLESAMPLE SYSTEM ({pct:.6}) REPEATABLE (7)",
                table.quoted()
            ),
            &[],
        )
        .await
        .map_err(|e| SourceError::query("sampling the table's rows", e))?
        .get(0);
    let sampled = sampled as f64 * 100.0 / pct;
    let est = if stats >= 1.0 && (0.5..=2.0).contains(&(stats / sampled.max(1.0))) {
        stats
    } else {
        sampled
    };
    Ok(est as u64)
}

async fn choose_key(
    client: &Client,
    table: &TableInfo,
    key_override: &[String],
) -> Result<Option<Vec<KeyCol>>, SourceError> {
    let describe = format!(
        "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull, {KEY_ORDERING_SQL} \
         FROM pg_attribute a {KEY_ORDERING_JOINS} WHERE a.attrelid = $1 AND a.attname = $2 \
         AND a.attnum > 0 AND NOT a.attisdropped"
    );
    if !key_override.is_empty() {
        let mut cols = Vec::new();
        for name in key_override {
            let row = client
                .query_opt(&describe, &[&table.oid, name])
                .await
                .map_err(|e| SourceError::query("reading the key column", e))?
                .ok_or_else(|| SourceError::ColumnNotFound {
                    table: table.quoted(),
                    column: name.clone(),
                })?;
            let col = KeyCol {
                col: key_column(&row),
                nullable: !row.get::<_, bool>(2),
            };
            check_orderable(client, table, &col.col).await?;
            cols.push(col);
        }
        return Ok(Some(cols));
    }
    // the primary key, else the narrowest unique index over not-null plain columns
    let indexes = client
        .query(
            "SELECT i.indexrelid FROM pg_index i \
             WHERE i.indrelid = $1 AND (i.indisprimary OR i.indisunique) AND i.indpred IS NULL \
               AND i.indexprs IS NULL \
             ORDER BY i.indisprimary DESC, i.indnkeyatts, i.indexrelid",
            &[&table.oid],
        )
        .await
        .map_err(|e| SourceError::query("reading the table's indexes", e))?;
    for idx in indexes {
        let idx: u32 = idx.get(0);
        let rows = client
            .query(
                &format!(
                    "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull, {KEY_ORDERING_SQL} \
                     FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey[0:i.indnkeyatts - 1]) WITH ORDINALITY AS k(attnum, ord) \
                     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum {KEY_ORDERING_JOINS} \
                     WHERE i.indexrelid = $1 ORDER BY k.ord"
                ),
                &[&idx],
            )
            .await
            .map_err(|e| SourceError::query("reading an index's columns", e))?;
        if rows.is_empty() || rows.iter().any(|r| !r.get::<_, bool>(2)) {
            continue;
        }
        return Ok(Some(
            rows.iter()
                .map(|r| KeyCol {
                    col: key_column(r),
                    nullable: false,
                })
                .collect(),
        ));
    }
    Ok(None)
}

/// The joins [`KEY_ORDERING_SQL`] needs, after `pg_attribute a`.
const KEY_ORDERING_JOINS: &str = "JOIN pg_type kt ON kt.oid = a.atttypid \
     LEFT JOIN pg_collation kc ON kc.oid = a.attcollation";

/// How the source orders a key column (see [`KeyOrdering`]), as two columns: its class
/// and the name of the collation (or type) it depends on. Only built-in scalar types are
/// `natural` or `bytes`: an enum, a domain, a composite or an array orders by something
/// of this database's own.
const KEY_ORDERING_SQL: &str = "\
    CASE WHEN kt.typtype <> 'b' OR kt.typcategory = 'A' \
              OR kt.typnamespace <> 'pg_catalog'::regnamespace THEN 'collation' \
         WHEN a.attcollation = 0 THEN 'natural' \
         WHEN (kc.collprovider = 'c' AND kc.collcollate IN ('C', 'POSIX')) \
              OR (kc.collprovider = 'd' AND (SELECT coalesce(to_jsonb(d) ->> 'datlocprovider', 'c') = 'c' \
                  AND d.datcollate IN ('C', 'POSIX') FROM pg_database d WHERE d.datname = current_database())) \
              THEN 'bytes' \
         ELSE 'collation' END, \
    CASE WHEN a.attcollation = 0 THEN format_type(a.atttypid, NULL) \
         WHEN kc.collprovider = 'd' THEN (SELECT coalesce(to_jsonb(d) ->> 'daticulocale', d.datcollate) \
              FROM pg_database d WHERE d.datname = current_database()) \
         ELSE kc.collname::text END";

/// A key column from a row of `name, type, not null, KEY_ORDERING_SQL`.
fn key_column(r: &tokio_postgres::Row) -> KeyColumn {
    let ordering = match r.get::<_, &str>(3) {
        "natural" => KeyOrdering::Natural,
        "bytes" => KeyOrdering::Bytes,
        _ => KeyOrdering::Collation(r.get::<_, Option<String>>(4).unwrap_or_default()),
    };
    KeyColumn {
        name: r.get(0),
        pg_type: r.get(1),
        ordering,
    }
}

async fn check_orderable(
    client: &Client,
    table: &TableInfo,
    col: &KeyColumn,
) -> Result<(), SourceError> {
    let sql = format!(
        "EXPLAIN SELECT 1 FROM {} ORDER BY {}",
        table.quoted(),
        quote_ident(&col.name)
    );
    match client.batch_execute(&sql).await {
        Ok(()) => Ok(()),
        Err(e) if e.code().is_some_and(|c| c.code() == "42883") => {
            Err(SourceError::KeyNotOrderable {
                column: col.name.clone(),
                pg_type: col.pg_type.clone(),
            })
        }
        Err(e) => Err(SourceError::query("checking the key's ordering", e)),
    }
}

/// The first key of tiles 2..n of the key's distribution: n-1 row-balanced boundaries.
async fn boundaries(
    client: &Client,
    table: &TableInfo,
    key: &[KeyCol],
    n: u64,
    estimated_rows: u64,
    filter: Option<&str>,
) -> Result<Vec<Vec<String>>, SourceError> {
    let cols: Vec<String> = key.iter().map(|k| quote_ident(&k.col.name)).collect();
    let list = cols.join(", ");
    let as_text: Vec<String> = cols.iter().map(|c| format!("{c}::text")).collect();
    // rows with a NULL key have their own chunk; an incremental job's rows are its window's
    let mut conditions: Vec<String> = cols.iter().map(|c| format!("{c} IS NOT NULL")).collect();
    conditions.extend(filter.map(|f| format!("({f})")));
    let sample = if estimated_rows > FULL_SCAN_ROWS {
        let want = (n.div_ceil(TILES_PER_CHUNK) * SAMPLE_PER_CHUNK).max(MIN_SAMPLE) as f64;
        let pct = (want * 100.0 / estimated_rows as f64).clamp(0.0001, 100.0);
        format!(" TABLESAMPLE SYSTEM ({pct:.6}) REPEATABLE (42)")
    } else {
        String::new()
    };
    // the tile number's alias, never one of the key's own column names
    let mut tile = "__haul_tile".to_owned();
    while key.iter().any(|k| k.col.name == tile) {
        tile.push('_');
    }
    let tile = quote_ident(&tile);
    let sql = format!(
        "SELECT {} FROM ( \
           SELECT DISTINCT ON ({tile}) {tile}, {list} FROM ( \
             SELECT {list}, ntile({n}) OVER (ORDER BY {list}) AS {tile} \
             FROM {table}{sample} WHERE {conditions} \
           ) t ORDER BY {tile}, {list} \
         ) b ORDER BY {tile}",
        as_text.join(", "),
        table = table.quoted(),
        conditions = conditions.join(" AND "),
    );
    // a key whose text is not UTF-8 (an SQL_ASCII database) cannot be read back as
    // bounds: say which columns, and how to split instead
    let not_text = |reason: String| SourceError::KeyNotText {
        columns: key
            .iter()
            .map(|k| format!("{:?}", k.col.name))
            .collect::<Vec<_>>()
            .join(", "),
        casts: key
            .iter()
            .map(|k| haul_shared::pg::cast_flag_to(&k.col.name, "bytea"))
            .collect::<Vec<_>>()
            .join(" "),
        reason,
    };
    let rows = client.query(&sql, &[]).await.map_err(|e| {
        let code = e.code().map(|c| c.code().to_owned());
        match code.as_deref() {
            // character_not_in_repertoire, untranslatable_character
            Some("22021" | "22P05") => not_text(pg_reason(&e)),
            _ => SourceError::query("sampling the key's distribution", e),
        }
    })?;
    let mut out = Vec::with_capacity(rows.len().saturating_sub(1));
    for r in rows.iter().skip(1) {
        let mut bound = Vec::with_capacity(key.len());
        for i in 0..key.len() {
            bound.push(
                r.try_get::<_, String>(i)
                    .map_err(|e| not_text(e.to_string()))?,
            );
        }
        out.push(bound);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn contains(r: &ChunkRange, k: i64) -> bool {
        let v = |b: &Option<Vec<String>>| b.as_ref().map(|b| b[0].parse::<i64>().unwrap());
        match r {
            ChunkRange::Key { lower, upper } => {
                v(lower).is_none_or(|l| k >= l) && v(upper).is_none_or(|u| k < u)
            }
            _ => unreachable!(),
        }
    }

    #[test]
    fn the_tail_shrinks() {
        // 10M rows in 11 chunks of 8 tiles for two workers: full chunks until four are
        // left, then shares of what is left, down to one tile
        assert_eq!(
            chunk_tiles(88, 8, 1, 2),
            [8, 8, 8, 8, 8, 8, 8, 8, 6, 5, 4, 3, 2, 1, 1, 1, 1]
        );
        assert_eq!(
            chunk_tiles(88, 8, 4, 2),
            [8, 8, 8, 8, 8, 8, 8, 8, 6, 5, 4, 4, 5]
        );
        assert_eq!(chunk_tiles(5, 8, 1, 1), [3, 1, 1]);
        assert_eq!(chunk_tiles(8, 8, 8, 1), [8]);
    }

    #[test]
    fn chunk_counts() {
        assert_eq!(chunk_count(0, 1000, 4), 1);
        assert_eq!(chunk_count(10_000_000, 1_000_000, 4), 10);
        assert_eq!(
            chunk_count(1_000_000, 1_000_000, 4),
            4,
            "every worker gets work"
        );
        assert_eq!(
            chunk_count(25_000, 1_000_000, 4),
            2,
            "but chunks stay >= 10k rows"
        );
        assert_eq!(chunk_count(5_000, 1_000, 4), 5);
    }

    proptest! {
        #[test]
        fn key_ranges_cover_and_never_overlap(
            mut bounds in proptest::collection::vec(-1000i64..1000, 0..20),
            keys in proptest::collection::vec(-1200i64..1200, 1..200),
        ) {
            bounds.sort();
            let ranges = split_bounds(bounds.iter().map(|b| vec![b.to_string()]).collect());
            for k in keys {
                let hits = ranges.iter().filter(|r| contains(r, k)).count();
                prop_assert_eq!(hits, 1, "key {} in {} ranges", k, hits);
            }
            // duplicate boundaries never make empty ranges
            for r in &ranges {
                if let ChunkRange::Key { lower: Some(l), upper: Some(u) } = r {
                    prop_assert!(l[0].parse::<i64>().unwrap() < u[0].parse::<i64>().unwrap());
                }
            }
        }

        #[test]
        fn chunk_tiles_cover_the_table_and_shrink_at_the_end(
            tiles in 1u64..2_000, full in 1u64..16, min in 1u64..16, workers in 1u64..64,
        ) {
            let sizes = chunk_tiles(tiles, full, min, workers);
            prop_assert_eq!(sizes.iter().sum::<u64>(), tiles);
            let min = min.min(full);
            for (i, s) in sizes.iter().enumerate() {
                // a piece above `full` is only ever the merged last one
                prop_assert!(*s <= full || (i + 1 == sizes.len() && *s < full + min));
                prop_assert!(*s >= min || sizes.len() == 1);
            }
            // never growing again once shrinking (but for the merged last piece)
            for w in sizes[..sizes.len().saturating_sub(1)].windows(2) {
                prop_assert!(w[1] <= w[0], "{:?}", sizes);
            }
        }

        #[test]
        fn picked_bounds_are_ordered_and_distinct(
            found in 0usize..300, tiles in 1u64..300, cuts in proptest::collection::btree_set(1u64..300, 0..40),
        ) {
            let bounds: Vec<Vec<String>> = (0..found).map(|i| vec![format!("{i:05}")]).collect();
            let cuts: Vec<u64> = cuts.into_iter().filter(|c| *c < tiles).collect();
            let picked = pick_bounds(bounds, &cuts, tiles);
            prop_assert!(picked.len() <= cuts.len());
            for w in picked.windows(2) {
                prop_assert!(w[0] < w[1]);
            }
        }

        #[test]
        fn ctid_ranges_cover_every_page_once(pages in 0u64..10_000, n in 1u64..64) {
            let tiles = n * TILES_PER_CHUNK;
            let cuts = tile_cuts(&chunk_tiles(tiles, TILES_PER_CHUNK, 1, 2));
            let ranges = ctid_ranges(pages, &cuts, tiles);
            prop_assert!(ranges.len() <= cuts.len() + 1);
            for p in 0..pages.min(2000) {
                let hits = ranges.iter().filter(|r| match r {
                    ChunkRange::All => true,
                    ChunkRange::Ctid { first_page, end_page } => p >= *first_page && end_page.is_none_or(|e| p < e),
                    _ => false,
                }).count();
                prop_assert_eq!(hits, 1);
            }
            if let Some(ChunkRange::Ctid { first_page, .. }) = ranges.first() {
                prop_assert_eq!(*first_page, 0);
            }
            if let Some(ChunkRange::Ctid { end_page, .. }) = ranges.last() {
                prop_assert!(end_page.is_none());
            }
        }
    }
}
