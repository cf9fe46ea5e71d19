//! The extraction engine end to end: every mapped type, every key shape, partitioning,
//! consistency under concurrent writes, and job identity.

use std::collections::BTreeMap;

use haul_shared::jobs::{Granularity, PartitionBy};
use haul_shared::lake::ChunkManifest;
use haul_shared::range::KeyOrdering;

use crate::harness::*;

const ALL_TYPES: &str = r#"
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
CREATE TABLE all_types (
  id bigint PRIMARY KEY,
  b boolean, i2 smallint, i4 integer, i8 bigint, o oid,
  f4 real, f8 double precision,
  n numeric(12,2), nbig numeric(50,10), nany numeric,
  t text, vc varchar(10), ch char(5), qc "char",
  by bytea, d date, tm time, ts timestamp, tz timestamptz, iv interval, u uuid,
  j json, jb jsonb, ip inet, net cidr, mac macaddr, ttz timetz,
  m mood, dom posint, ia integer[], ta text[], na numeric(6,3)[], ua uuid[]
);
INSERT INTO all_types VALUES
 (1, true, -32768, -2147483648, -9223372036854775808, 4294967295,
  'NaN', 'Infinity', -9999999999.99, 1234567890123456789012345678901234567890.0123456789, 'NaN',
  '', 'ten chars!', 'ab', 'x',
  '\x00ff10', 'infinity', '00:00:00', 'infinity', '-infinity', '-178000000 years', '00000000-0000-0000-0000-000000000000',
  '{"a": [1, 2.50, "x"]}', '{"b": {"c": null}, "a": 1}', '192.168.0.1/24', '10.0.0.0/8', '08:00:2b:01:02:03', '12:34:56.789+05:30',
  'sad', 1, '{}', '{NULL,"",x}', '{1.5,NULL,-0.001}', '{}'),
 (2, false, 32767, 2147483647, 9223372036854775807, 0,
  '-Infinity', '-0', 0.01, -0.0000000001, 'Infinity',
  E'quote'' "dq" back\\slash\nnewline\ttab, comma | pipe', 'ünïcødé', 'abcde', 'Z',
  '', '-infinity', '23:59:59.999999', '1900-01-01 00:00:00.000001', '2038-01-19 03:14:07.123456+00', '1 year 2 months 3 days 04:05:06.789', 'ffffffff-ffff-ffff-ffff-ffffffffffff',
  '[]', '[]', '::1', '2001:db8::/32', 'ff:ff:ff:ff:ff:ff', '00:00:00+00',
  'happy', 2147483647, '{-1,0,1}', '{"a,b","c\"d"}', '{}', '{00000000-0000-0000-0000-000000000001}'),
 (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
 (4, true, 1, 1, 1, 1, 1.5, 5e-324, 0, 0, 1e-100, '😀 emoji', '', '     ', ' ',
  '\x', '2000-01-01', '12:00', '2000-01-01 00:00:00', '1970-01-01 00:00:00+00', '-1 days -00:00:00.000001', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
  'null', 'null', '0.0.0.0/0', '0.0.0.0/0', '00:00:00:00:00:00', '24:00:00-15:59',
  'ok', 7, NULL, NULL, NULL, NULL);
INSERT INTO all_types
SELECT g, g % 3 = 0, (g % 30000)::int2, g * 7, g::int8 * 1000003, g,
       g / 7.0, g * 1.000001e10, g / 100.0, g * 1.5, g / 3.0,
       CASE WHEN g % 11 = 0 THEN NULL ELSE 'row ' || g END, left(md5(g::text), 10), left(md5(g::text), 3), chr(65 + g % 26),
       decode(md5(g::text), 'hex'), date '2000-01-01' + g, time '00:00' + g * interval '1 second',
       timestamp '2020-01-01' + g * interval '1 minute', timestamptz '2020-01-01 00:00:00+00' + g * interval '1.5 seconds',
       g * interval '1 hour 1 microsecond', md5(g::text)::uuid,
       json_build_object('g', g), jsonb_build_object('g', g, 'h', g::text), ('10.0.' || (g % 256) || '.1')::inet,
       ('10.' || (g % 256) || '.0.0/16')::cidr, ('08:00:2b:01:02:' || lpad(to_hex(g % 256), 2, '0'))::macaddr,
       (time '00:00' + g * interval '1 second')::timetz,
       (ARRAY['sad', 'ok', 'happy'])[1 + g % 3]::mood, 1 + g % 1000,
       ARRAY[g, NULL, -g], CASE WHEN g % 5 = 0 THEN NULL ELSE ARRAY['a' || g, NULL] END, ARRAY[g / 8.0]::numeric(6,3)[],
       ARRAY[md5(g::text)::uuid]
FROM generate_series(5, 3000) g;
"#;

/// A table with inheritance children exports as `SELECT * FROM parent` reads it (the
/// parent's rows and every child's, in the parent's columns), as the README says: split
/// by key and by pages alike.
#[tokio::test]
async fn an_inheritance_parent_exports_its_children_too() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE parent (id int PRIMARY KEY, v text);
         CREATE TABLE kid_a (extra int) INHERITS (parent);
         CREATE TABLE kid_b () INHERITS (parent);
         INSERT INTO parent SELECT g, 'p' || g FROM generate_series(1, 2000) g;
         INSERT INTO kid_a SELECT g, 'a' || g, g FROM generate_series(2001, 5000) g;
         INSERT INTO kid_b SELECT g, 'b' || g FROM generate_series(5001, 6000) g;
         ANALYZE;",
    )
    .await;
    for split in [
        haul_shared::jobs::Split::Key,
        haul_shared::jobs::Split::Ctid,
    ] {
        let dest = TempDest::new();
        let mut o = options(&db.dsn, "parent", &dest);
        o.spec.chunk_rows = 1000;
        o.spec.split = split;
        assert_eq!(run(o).await.unwrap().rows, 6000, "{split:?}");
        assert_same(&db.client, "parent", &dest.0.join("parent")).await;
    }
}

#[tokio::test]
async fn every_mapped_type_round_trips() {
    let db = TestDb::new().await;
    db.exec(ALL_TYPES).await;
    let dest = TempDest::new();
    let mut o = options(&db.dsn, "public.all_types", &dest);
    o.spec.chunk_rows = 700;
    let s = run(o).await.expect("job succeeds");
    assert_eq!(s.rows, 3000);
    assert!(s.chunks >= 4, "planned {} chunks", s.chunks);
    let out = dest.0.join("all_types");
    assert_same(&db.client, "all_types", &out).await;

    // the Arrow schema carries the Postgres types, and the mapping is the documented one
    let cols: BTreeMap<String, String> = output_columns(&out)
        .into_iter()
        .map(|(n, t)| (n, t.to_string()))
        .collect();
    assert_eq!(cols["n"], "Decimal128(12, 2)");
    assert_eq!(cols["nbig"], "Decimal256(50, 10)");
    assert_eq!(cols["nany"], "Utf8");
    assert_eq!(cols["tz"], "Timestamp(µs, \"UTC\")");
    assert_eq!(cols["ts"], "Timestamp(µs)");
    assert_eq!(cols["u"], "FixedSizeBinary(16)");
    assert!(cols["ia"].starts_with("List("), "{}", cols["ia"]);
    assert!(cols["iv"].starts_with("Struct("), "{}", cols["iv"]);

    // a Delta Lake reader (delta-rs) reads every column through the table's log, each
    // value the one the Parquet holds (time as microseconds, numeric above 38 digits as
    // text, uuid as binary: the types Delta has)
    let script = r#"
import sys, deltalake, pyarrow as pa, pyarrow.dataset as ds, pyarrow.compute as pc
root = sys.argv[1]
d = deltalake.DeltaTable(root).to_pyarrow_table().sort_by("id")
g = ds.dataset(root, format="parquet").to_table().sort_by("id")
assert d.num_rows == g.num_rows == 3000, (d.num_rows, g.num_rows)
bad = []
for name in g.column_names:
    want, got = g[name], d[name]
    if want.type != got.type:
        want = pc.cast(want, got.type)
    # (NaN is equal to NaN here, not in Arrow's equals)
    if not want.equals(got) and list(map(repr, want.to_pylist())) != list(map(repr, got.to_pylist())):
        bad.append(name)
print("differ:", bad)
sys.exit(1 if bad else 0)
"#;
    let out = std::process::Command::new(test_python())
        .args(["-c", script, &out.display().to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `table` through haul with `chunk_rows` and checks the output; returns the chunk
/// manifests.
async fn export_and_check(
    db: &TestDb,
    table: &str,
    chunk_rows: u64,
    key: &[&str],
    min_chunks: usize,
) -> Vec<ChunkManifest> {
    let dest = TempDest::new();
    let mut o = options(&db.dsn, table, &dest);
    o.spec.chunk_rows = chunk_rows;
    o.spec.key = key.iter().map(|s| s.to_string()).collect();
    o.job_id = Some(haul_shared::JobId::parse("j-check").unwrap());
    let s = run(o).await.unwrap_or_else(|e| panic!("{table}: {e}"));
    assert!(
        s.chunks >= min_chunks,
        "{table}: {} chunks, wanted at least {min_chunks}",
        s.chunks
    );
    let resolved: (String, String) = {
        let r = db
            .client
            .query_one(
                "SELECT n.nspname::text, c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass($1)",
                &[&table],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    let quoted = format!(
        "{}.{}",
        haul_shared::pg::quote_ident(&resolved.0),
        haul_shared::pg::quote_ident(&resolved.1)
    );
    let out = dest
        .0
        .join(haul_shared::lake::table_dir(&resolved.0, &resolved.1));
    if s.rows > 0 {
        assert_same(&db.client, &quoted, &out).await;
    } else {
        assert!(parquet_files(&out).is_empty());
    }
    let mut manifests = Vec::new();
    let dir = dest.0.join("_haul/jobs/j-check/chunks");
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        manifests.push(serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap());
    }
    manifests
}

#[tokio::test]
async fn skewed_integer_keys_split_by_rows_not_key_width() {
    let db = TestDb::new().await;
    // like the benchmark: 70% of rows dense at the start, 30% sparse with stride 20; a
    // min/max split would put 83% of the rows in the first half
    db.exec(
        "CREATE TABLE small_skew (id bigint PRIMARY KEY, v text);
         INSERT INTO small_skew SELECT CASE WHEN g <= 7000 THEN g ELSE 7000 + (g - 7000) * 20 END, 'v' || g
         FROM generate_series(1, 10000) g;
         CREATE TABLE big_skew (id bigint PRIMARY KEY, v text);
         INSERT INTO big_skew SELECT CASE WHEN g <= 140000 THEN g ELSE 140000 + (g - 140000) * 20 END, 'v' || g
         FROM generate_series(1, 200000) g;
         ANALYZE;",
    )
    .await;
    // exact quantiles (small table) and page-sampled quantiles (big table); each chunk
    // holds the rows the planner meant it to (full chunks, then a shrinking tail)
    // (chunks under 10k rows are never cut, so the small table has no tail to shrink)
    for (table, rows, chunk_rows, chunks, tail) in [
        ("small_skew", 10_000, 2500, 4, false),
        ("big_skew", 200_000, 25000, 8, true),
    ] {
        let mut manifests = export_and_check(&db, table, chunk_rows, &[], chunks).await;
        manifests.sort_by_key(|m| m.chunk);
        let (tiles, sizes) = haul_coordinator::planner::tile_plan(rows, chunk_rows, 2);
        assert_eq!(manifests.len(), sizes.len(), "{table}");
        assert_eq!(
            sizes.windows(2).any(|w| w[1] < w[0]),
            tail,
            "{table}: {sizes:?}"
        );
        for (m, size) in manifests.iter().zip(&sizes) {
            let want = rows * size / tiles;
            let (lo, hi) = (want * 6 / 10, want * 14 / 10);
            assert!(
                (lo..=hi).contains(&m.rows),
                "{table}: chunk {} has {} rows, wanted {lo}..={hi}; ranges are not row-balanced",
                m.chunk,
                m.rows
            );
        }
    }
}

/// Regression (issue 12): chunk sizes followed the statistics, however stale: a table
/// analyzed at 10 rows and then grown to 200k was cut as one chunk for `--chunk-rows
/// 20000`, and one analyzed at 300k rows of which 90% were then deleted into 30 chunks of
/// 1k. The planner checks the statistics against a page sample: chunks stay within 2× of
/// the target either way.
#[tokio::test]
async fn chunk_sizes_hold_when_the_statistics_lie() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE grown (id bigint PRIMARY KEY, v text) WITH (autovacuum_enabled = false);
         INSERT INTO grown SELECT g, 'v' || g FROM generate_series(1, 10) g;
         ANALYZE grown;
         INSERT INTO grown SELECT g, 'v' || g FROM generate_series(11, 200000) g;
         CREATE TABLE shrunk (id bigint PRIMARY KEY, v text) WITH (autovacuum_enabled = false);
         INSERT INTO shrunk SELECT g, 'v' || g FROM generate_series(1, 300000) g;
         ANALYZE shrunk;
         DELETE FROM shrunk WHERE id % 10 <> 0;",
    )
    .await;
    for (table, rows, chunk_rows) in [("grown", 200_000u64, 20_000u64), ("shrunk", 30_000, 10_000)]
    {
        let m = export_and_check(&db, table, chunk_rows, &[], 1).await;
        let sizes: Vec<u64> = m.iter().map(|m| m.rows).collect();
        assert_eq!(sizes.iter().sum::<u64>(), rows, "{table}");
        assert!(
            sizes.iter().all(|&n| n <= 2 * chunk_rows),
            "{table}: chunks of {sizes:?} rows for --chunk-rows {chunk_rows}"
        );
        assert!(
            sizes.len() as u64 <= 2 * rows.div_ceil(chunk_rows) + 1,
            "{table}: {} chunks of {sizes:?} rows for --chunk-rows {chunk_rows}",
            sizes.len()
        );
    }
}

#[tokio::test]
async fn uuid_text_and_composite_keys() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE by_uuid (id uuid PRIMARY KEY, v int);
         INSERT INTO by_uuid SELECT md5(g::text)::uuid, g FROM generate_series(1, 5000) g;
         CREATE TABLE by_text (code text COLLATE \"C\" PRIMARY KEY, v int);
         INSERT INTO by_text SELECT 'k' || (g * 7919 % 5000) || repeat('x', g % 3), g FROM generate_series(1, 5000) g;
         CREATE TABLE by_pair (tenant int, seq bigint, v text, PRIMARY KEY (tenant, seq));
         INSERT INTO by_pair SELECT g % 3, g, 'v' FROM generate_series(1, 6000) g;
         ANALYZE;",
    )
    .await;
    for t in ["by_uuid", "by_text", "by_pair"] {
        let m = export_and_check(&db, t, 1000, &[], 4).await;
        let total: u64 = m.iter().map(|m| m.rows).sum();
        assert!(total >= 5000, "{t}");
        assert!(
            m.iter().all(|m| m.rows > 300),
            "{t}: unbalanced {:?}",
            m.iter().map(|m| m.rows).collect::<Vec<_>>()
        );
    }
}

#[tokio::test]
async fn tables_without_a_key_use_page_ranges() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE heap (a int, b text);
         INSERT INTO heap SELECT g % 10, repeat('x', 50) FROM generate_series(1, 8000) g;
         DELETE FROM heap WHERE a = 3; ANALYZE heap;",
    )
    .await;
    let m = export_and_check(&db, "heap", 1500, &[], 3).await;
    assert!(
        m.iter()
            .all(|m| matches!(m.range, haul_shared::ChunkRange::Ctid { .. }))
    );
}

#[tokio::test]
async fn split_ctid_uses_page_ranges_even_with_a_key() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE keyed (id uuid PRIMARY KEY, v text);
         INSERT INTO keyed SELECT md5(g::text)::uuid, repeat('x', 40) FROM generate_series(1, 30000) g; ANALYZE keyed;",
    )
    .await;
    let dest = TempDest::new();
    let mut o = options(&db.dsn, "keyed", &dest);
    o.spec.split = haul_shared::jobs::Split::Ctid;
    o.spec.chunk_rows = 5000;
    o.job_id = Some(haul_shared::JobId::parse("ctid").unwrap());
    let s = run(o).await.unwrap();
    assert!(s.chunks >= 5, "{} chunks", s.chunks);
    assert_same(&db.client, "keyed", &dest.0.join("keyed")).await;
    for e in std::fs::read_dir(dest.0.join("_haul/jobs/ctid/chunks"))
        .unwrap()
        .flatten()
    {
        let m: ChunkManifest = serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap();
        assert!(
            matches!(m.range, haul_shared::ChunkRange::Ctid { .. }),
            "{:?}",
            m.range
        );
    }
}

#[tokio::test]
async fn rows_with_null_keys_are_never_skipped() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE nullable (k int, v text);
         INSERT INTO nullable SELECT CASE WHEN g % 10 = 0 THEN NULL ELSE g END, 'v' || g FROM generate_series(1, 4000) g;
         ANALYZE nullable;",
    )
    .await;
    let m = export_and_check(&db, "nullable", 1000, &["k"], 4).await;
    let nulls = m
        .iter()
        .find(|m| m.range == haul_shared::ChunkRange::NullKeys)
        .expect("a chunk for NULL keys");
    assert_eq!(nulls.rows, 400);
}

#[tokio::test]
async fn quoted_mixed_case_names_partitions_and_empty_tables() {
    let db = TestDb::new().await;
    db.exec(
        r#"CREATE SCHEMA "Sales Dept";
           CREATE TABLE "Sales Dept"."My ""Orders""" ("Select" int PRIMARY KEY, "Mixed Case" text, "from" date);
           INSERT INTO "Sales Dept"."My ""Orders""" SELECT g, 'x' || g, date '2024-01-01' + g FROM generate_series(1, 3000) g;
           CREATE TABLE events (id bigint, at date, v text, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
           CREATE TABLE events_2023 PARTITION OF events FOR VALUES FROM ('2023-01-01') TO ('2024-01-01');
           CREATE TABLE events_2024 PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
           INSERT INTO events SELECT g, date '2023-06-01' + (g % 400), 'e' FROM generate_series(1, 4000) g;
           CREATE TABLE empty (id int PRIMARY KEY, v text);
           CREATE TABLE tiles ("__haul_tile" int PRIMARY KEY, v text);
           INSERT INTO tiles SELECT g, 't' || g FROM generate_series(1, 3000) g;
           ANALYZE;"#,
    )
    .await;
    export_and_check(&db, r#""Sales Dept"."My ""Orders""""#, 1000, &[], 3).await;
    export_and_check(&db, "events", 1000, &[], 3).await;
    export_and_check(&db, "empty", 1000, &[], 1).await;
    // a key column named like the planner's own alias (issue 12: it collided)
    export_and_check(&db, "tiles", 1000, &[], 3).await;
}

#[tokio::test]
async fn hive_partitioning_by_day() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE orders (id bigint PRIMARY KEY, created_at timestamptz, total int);
         INSERT INTO orders SELECT g, timestamptz '2024-03-01 00:00:00+00' + g * interval '37 minutes', g
         FROM generate_series(1, 3000) g;
         INSERT INTO orders VALUES (0, NULL, 0);",
    )
    .await;
    let dest = TempDest::new();
    let mut o = options(&db.dsn, "orders", &dest);
    o.spec.output.partition_by = Some(PartitionBy::new("created_at", Granularity::Day));
    o.spec.chunk_rows = 800;
    run(o).await.unwrap();
    let out = dest.0.join("orders");
    assert_same(&db.client, "orders", &out).await;
    let days: i64 = db
        .client
        .query_one(
            "SELECT count(DISTINCT created_at::date) FROM orders WHERE created_at IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let dirs = subdir_names(&out);
    assert_eq!(dirs.len() as i64, days + 1, "{dirs:?}");
    assert!(dirs.contains(&"dt=2024-03-01".to_string()));
    assert!(dirs.contains(&"dt=__HIVE_DEFAULT_PARTITION__".to_string()));
    // every row sits in the folder of its own day
    let days: Vec<String> = dirs
        .into_iter()
        .filter(|d| d.as_str() != "dt=__HIVE_DEFAULT_PARTITION__")
        .collect();
    each_day_holds_its_rows(&db, "orders WHERE created_at::date", &out, &days).await;
}

/// Every `dt=<day>` folder of `out` holds as many rows as `SELECT count(*) FROM <rows> =
/// <day>` counts in the source.
async fn each_day_holds_its_rows(db: &TestDb, rows: &str, out: &std::path::Path, dirs: &[String]) {
    for d in dirs {
        let day = d.trim_start_matches("dt=");
        let want: i64 = db
            .client
            .query_one(
                &format!("SELECT count(*) FROM {rows} = $1::text::date"),
                &[&day],
            )
            .await
            .unwrap()
            .get(0);
        let got: usize = read_batches(&out.join(d))
            .iter()
            .map(|b| b.num_rows())
            .sum();
        assert_eq!(got as i64, want, "{d}");
    }
}

/// Regression: partitioning by a column not in key order wrote one Parquet file per row
/// (the writer cut a file at every change of day and kept 16 open, so 120 days cycling
/// row by row made 30,000 files). Rows are held back by partition now: each chunk writes
/// about one file per partition, whatever the order, and every row is in its day. `haul
/// plan` counts the partitions a chunk touches, and warns of the small files.
#[tokio::test]
async fn partitioning_rows_out_of_day_order_makes_a_file_per_partition_per_chunk() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE events (id bigint PRIMARY KEY, created_at date NOT NULL, note text);
         INSERT INTO events SELECT g, date '2023-01-01' + (g * 7919 % 120)::int, md5(g::text)
         FROM generate_series(1, 30000) g;
         ANALYZE events;",
    )
    .await;
    let dest = TempDest::new();
    let options = || {
        let mut o = options(&db.dsn, "events", &dest);
        o.spec.output.partition_by = Some(PartitionBy::new("created_at", Granularity::Day));
        o.spec.chunk_rows = 10_000;
        o.spec.output.batch_rows = 1000;
        o
    };
    let plan = haul::dry_run::plan(&options()).await.unwrap();
    assert_eq!(plan.partitions_per_chunk, Some(120));
    assert!(
        plan.to_string()
            .contains("the first chunk's rows fall in 120 partitions"),
        "{plan}"
    );
    let summary = run(options()).await.unwrap();
    let out = dest.0.join("events");
    assert_same(&db.client, "events", &out).await;
    let dirs = subdir_names(&out);
    assert_eq!(dirs.len(), 120, "{dirs:?}");
    let files = parquet_files(&out).len() as u64;
    assert!(
        files <= summary.chunks as u64 * 120,
        "{files} files for {} chunks over 120 days",
        summary.chunks
    );
    each_day_holds_its_rows(&db, "events WHERE created_at", &out, &dirs).await;
}

#[tokio::test]
async fn one_snapshot_under_concurrent_writes() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE accounts (id int PRIMARY KEY, amount bigint NOT NULL);
         INSERT INTO accounts SELECT g, 1000 FROM generate_series(1, 20000) g; ANALYZE accounts;",
    )
    .await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..2 {
        let (dsn, stop) = (db.dsn.clone(), std::sync::Arc::clone(&stop));
        writers.push(tokio::spawn(async move {
            let c = connect(&dsn).await;
            let mut moves = 0u64;
            let mut i: i64 = w * 7919;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                // move money between a row at the start and one at the end of the key space
                let (a, b) = ((i * 31) % 20000 + 1, 20000 - (i * 17) % 20000);
                let sql = format!(
                    "BEGIN; UPDATE accounts SET amount = amount - 7 WHERE id = {a}; \
                     UPDATE accounts SET amount = amount + 7 WHERE id = {b}; COMMIT;"
                );
                if c.batch_execute(&sql).await.is_ok() {
                    moves += 1;
                } else {
                    let _ = c.batch_execute("ROLLBACK").await;
                }
            }
            moves
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let dest = TempDest::new();
    let mut o = options(&db.dsn, "accounts", &dest);
    o.spec.chunk_rows = 500; // 40 chunks read over a while, each in the one snapshot
    let s = run(o).await.unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut moves = 0;
    for w in writers {
        moves += w.await.unwrap();
    }
    assert!(moves > 0, "the writers made no transfers during the export");
    assert_eq!(s.rows, 20000);
    let total: i128 = read_batches(&dest.0.join("accounts"))
        .iter()
        .flat_map(|b| {
            let c = b.column_by_name("amount").unwrap();
            arrow_array::cast::AsArray::as_primitive::<arrow_array::types::Int64Type>(c)
                .values()
                .to_vec()
        })
        .map(|v| v as i128)
        .sum();
    assert_eq!(total, 20_000_000, "the export mixed points in time");
}

#[tokio::test]
async fn a_finished_job_id_is_a_no_op_and_destinations_are_not_mixed() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 2500);")
        .await;
    let dest = TempDest::new();
    let job = haul_shared::JobId::parse("nightly-1").unwrap();
    let mut o = options(&db.dsn, "t", &dest);
    o.job_id = Some(job.clone());
    let first = run(o.clone()).await.unwrap();
    assert!(!first.already_done);
    // a committed job leaves no staging behind, not even empty directories (issue 16)
    assert!(!dest.0.join("_haul/staging").exists());
    // `haul run --json` prints the summary as JSON: here, the no-op rerun's (issue 16)
    let out = std::process::Command::new(haul_bin())
        .args([
            "run",
            "--source",
            &db.dsn,
            "--table",
            "t",
            "--dest",
            &dest.url(),
            "--job-id",
            "nightly-1",
            "--json",
            "--progress",
            "none",
        ])
        .output()
        .unwrap();
    assert_success(&out);
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["job_id"], "nightly-1");
    assert_eq!(summary["already_done"], true);
    assert_eq!(summary["rows"], 2500);
    let files = parquet_files(&dest.0.join("t"));
    db.exec("INSERT INTO t VALUES (999999)").await;
    let again = run(o.clone()).await.unwrap();
    assert!(again.already_done);
    assert_eq!(again.rows, 2500);
    assert_eq!(
        parquet_files(&dest.0.join("t")),
        files,
        "a no-op writes nothing"
    );
    // the same id for another table, or other columns, is refused: a no-op would skip it
    // (issue 16); the same table named with its schema is the same job
    db.exec("CREATE TABLE other (id int PRIMARY KEY)").await;
    let mut reused = options(&db.dsn, "other", &dest);
    reused.job_id = Some(job.clone());
    let err = run(reused).await.unwrap_err().to_string();
    assert!(
        err.contains("job id nightly-1 is taken") && err.contains("table t, not other"),
        "{err}"
    );
    let mut narrower = o.clone();
    narrower.spec.columns = vec!["id".into()];
    let err = run(narrower).await.unwrap_err().to_string();
    // (as the flags say them, not as Rust's debug text: `[]`, `["id"]`, `Some(..)`)
    assert!(
        err.contains("exported columns every column, not id"),
        "{err}"
    );
    let mut partitioned = o.clone();
    partitioned.spec.output.partition_by = Some(PartitionBy::new("created_at", Granularity::Day));
    let err = run(partitioned).await.unwrap_err().to_string();
    assert!(
        err.contains("exported partitioning none, not created_at:day"),
        "{err}"
    );
    let mut qualified = o.clone();
    qualified.spec.table = "public.t".into();
    assert!(run(qualified).await.unwrap().already_done);

    // a different job into the same table folder must not mix with the first
    let mut other = options(&db.dsn, "t", &dest);
    other.job_id = Some(haul_shared::JobId::parse("nightly-2").unwrap());
    let err = run(other.clone()).await.unwrap_err().to_string();
    assert!(
        err.contains("--overwrite") && err.contains("nightly-1"),
        "{err}"
    );
    other.overwrite = true;
    let s = run(other).await.unwrap();
    assert_eq!(s.rows, 2501);
    assert_same(&db.client, "t", &dest.0.join("t")).await;
}

#[tokio::test]
async fn output_options_are_honoured() {
    use parquet::basic::Compression;
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 6000) g;")
        .await;
    let dest = TempDest::new();
    let mut o = options(&db.dsn, "t", &dest);
    o.spec.chunk_rows = 3000;
    o.spec.output.compression = haul_shared::jobs::Compression::Zstd { level: 5 };
    o.spec.output.row_group_rows = 400;
    o.spec.output.max_file_rows = 1000;
    o.spec.output.batch_rows = 256;
    o.spec.output.fsync = true;
    run(o).await.unwrap();
    let files = parquet_files(&dest.0.join("t"));
    assert!(files.len() >= 6, "{} files", files.len());
    for f in &files {
        let r = SerializedFileReader::new(std::fs::File::open(f).unwrap()).unwrap();
        let md = r.metadata();
        assert!(
            md.file_metadata().num_rows() <= 1000,
            "file {f:?} over the row limit"
        );
        for rg in md.row_groups() {
            assert!(rg.num_rows() <= 400, "row group over the limit");
            let c = rg.column(0);
            assert!(matches!(c.compression(), Compression::ZSTD(_)));
            assert!(c.statistics().is_some(), "statistics are on");
        }
        assert!(
            md.file_metadata()
                .key_value_metadata()
                .is_some_and(|kv| kv.iter().any(|k| k.key == "ARROW:schema")),
            "the Arrow schema is embedded"
        );
    }
    assert_same(&db.client, "t", &dest.0.join("t")).await;
}

#[tokio::test]
async fn chunk_sessions_over_a_unix_socket_and_past_a_dead_host() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 5000) g;",
    )
    .await;
    let settings = db
        .client
        .query_one(
            "SELECT current_setting('port'), current_setting('unix_socket_directories')",
            &[],
        )
        .await
        .unwrap();
    let (port, dirs): (String, String) = (settings.get(0), settings.get(1));
    let dir = dirs.split(',').next().unwrap().trim().to_owned();
    // a key=value DSN: the first host refuses, the chunk readers (like the planner) go on
    // to the next, then the same over the server's Unix socket when it is on this machine
    let mut dsns = vec![format!(
        "host=127.0.0.1,127.0.0.1 port=1,{port} user=postgres dbname={}",
        db.name
    )];
    if std::path::Path::new(&dir)
        .join(format!(".s.PGSQL.{port}"))
        .exists()
    {
        dsns.push(format!(
            "host={dir} port={port} user=postgres dbname={}",
            db.name
        ));
    } else {
        eprintln!("no Unix socket at {dir}: the server is elsewhere, skipping that part");
    }
    for dsn in dsns {
        let dest = TempDest::new();
        let s = run(options(&dsn, "t", &dest))
            .await
            .unwrap_or_else(|e| panic!("{dsn}: {e}"));
        assert!(s.chunks >= 2, "{dsn}: {} chunks", s.chunks);
        assert_same(&db.client, "public.t", &dest.0.join("t")).await;
    }
}

/// Regression (issue 12): with a nullable column in a composite key, a row such as
/// `(5, NULL)` was read by its key range *and* by the NULL-key chunk (a row comparison
/// decides at the first unequal pair), so the export held it twice (109901 rows of
/// 100000). The issue's repro, through `haul run`, count and checksum against the source.
#[tokio::test]
async fn a_nullable_composite_key_puts_every_row_in_one_chunk() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE t (a int NOT NULL, b int, v text);
         INSERT INTO t SELECT i/10, NULLIF(i%10,3), 'r'||i FROM generate_series(1, 100000) i;
         ANALYZE t;",
    )
    .await;
    let m = export_and_check(&db, "t", 1000, &["a", "b"], 20).await;
    assert_eq!(m.iter().map(|c| c.rows).sum::<u64>(), 100_000);
}

/// The planner's chunks partition every row exactly once, for any key shape, checked on
/// Postgres's own semantics: random tables with nullable single and composite keys (small
/// domains, so ties, NULLs in any position and duplicate boundaries are common; text under
/// byte order and under ICU, mixed case and accents), planned by the planner, and each
/// row's count of matching chunk predicates must be exactly 1. A key the source compares
/// in byte order keeps its chunks in a table whose column has another collation when a
/// loader compares it under `COLLATE "C"`.
#[tokio::test]
async fn chunk_predicates_partition_rows_for_any_nullable_key_shape() {
    use haul_coordinator::planner;
    let db = TestDb::new().await;
    let shapes: [&[&str]; 9] = [
        &["k1"],
        &["k1", "k2"],
        &["k2", "k1"],
        &["k1", "k2", "k3"],
        &["k3", "k2"],
        &["k4"],
        &["k5"],
        &["k5", "k1"],
        &["k4", "k5"],
    ];
    // a small linear congruential generator and a seeded random(): the same cases on
    // every run
    let mut seed: u64 = 0x5eed;
    let mut next = move |n: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % n
    };
    for case in 0..27 {
        let key = shapes[case % shapes.len()];
        let rows = 200 + next(3000);
        let (domain, null_pct) = (2 + next(40), next(40));
        let table = format!("p{case}");
        db.exec(&format!(
            "SELECT setseed({case} / 100.0);
             CREATE TABLE {table} (id int, k1 int, k2 int, k3 text,
               k4 text COLLATE \"C\", k5 text COLLATE \"und-x-icu\");
             INSERT INTO {table} SELECT g,
               CASE WHEN random() * 100 < {null_pct} THEN NULL ELSE (random() * {domain})::int END,
               CASE WHEN random() * 100 < {null_pct} THEN NULL ELSE (random() * {domain})::int END,
               CASE WHEN random() * 100 < {null_pct} THEN NULL ELSE md5(((random() * {domain})::int)::text) END,
               CASE WHEN random() * 100 < {null_pct} THEN NULL ELSE {word} END,
               CASE WHEN random() * 100 < {null_pct} THEN NULL ELSE {word} END
             FROM generate_series(1, {rows}) g;
             ANALYZE {table};
             CREATE TABLE {table}_icu AS SELECT * FROM {table};
             ALTER TABLE {table}_icu ALTER COLUMN k4 TYPE text COLLATE \"und-x-icu\";",
            // mixed case, accents and punctuation: orders that byte order and ICU disagree on
            word = format!(
                "(ARRAY['a', 'B', 'b', 'A', 'é', 'E', '_x', 'Z', 'z', 'ä', 'a b', 'ab'])[1 + (random() * 11)::int] || ((random() * {domain})::int)::text"
            )
        ))
        .await;
        let info = haul_shared::pg::resolve_table(&db.client, &table, &[], &Default::default())
            .await
            .unwrap();
        let key: Vec<String> = key.iter().map(|k| k.to_string()).collect();
        let chunk_rows = 20 + next(400);
        let plan = planner::plan(
            &db.client,
            &info,
            &key,
            chunk_rows,
            2,
            haul_shared::jobs::Split::Key,
            None,
        )
        .await
        .unwrap();
        let hits: Vec<String> = plan
            .chunks
            .iter()
            .map(|c| format!("coalesce(({})::int, 0)", c.predicate(&plan.key)))
            .collect();
        let wrong: i64 = db
            .client
            .query_one(
                &format!(
                    "SELECT count(*) FROM (SELECT {} AS hits FROM {table}) s WHERE hits <> 1",
                    hits.join(" + ")
                ),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            wrong,
            0,
            "case {case}: key {key:?}, {rows} rows, domain {domain}, {null_pct}% NULLs, {} chunks: {wrong} rows in no chunk or in several",
            plan.chunks.len()
        );
        // how the source orders each key column, for a loader to know what a range means
        // in its target
        for k in &plan.key {
            let want = match k.name.as_str() {
                "k4" => KeyOrdering::Bytes,
                "k5" => KeyOrdering::Collation("und-x-icu".into()),
                _ if k.pg_type == "text" => KeyOrdering::Collation("C.UTF-8".into()),
                _ => KeyOrdering::Natural,
            };
            assert_eq!(k.ordering, want, "case {case}: {}", k.name);
        }
        // a byte-order key compared under COLLATE "C" in a copy whose column is under ICU:
        // every chunk holds the same rows there
        if key == ["k4"] {
            let collated = [r#""k4" COLLATE "C""#.to_owned()];
            for c in &plan.chunks {
                let n = |table: String, pred: String| {
                    let client = &db.client;
                    async move {
                        client
                            .query_one(&format!("SELECT count(*) FROM {table} WHERE {pred}"), &[])
                            .await
                            .unwrap()
                            .get::<_, i64>(0)
                    }
                };
                assert_eq!(
                    n(format!("{table}_icu"), c.predicate_on(&plan.key, &collated)).await,
                    n(table.clone(), c.predicate(&plan.key)).await,
                    "case {case}: chunk {c:?}"
                );
            }
        }
    }
}

/// `--lineage-columns`: every row carries the job's id and its snapshot's time (read back
/// with an independent reader), and a table that has a column of either name is refused
/// before anything is written.
#[tokio::test]
async fn lineage_columns_carry_the_job_and_its_snapshot_time() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE t (id bigint PRIMARY KEY, note text);
         INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 5000) g;",
    )
    .await;
    let dest = TempDest::new();
    let now_us = || async {
        let row = db
            .client
            .query_one("SELECT (extract(epoch FROM now()) * 1000000)::int8", &[])
            .await
            .unwrap();
        row.get::<_, i64>(0)
    };
    let before = now_us().await;
    let mut o = options(&db.dsn, "public.t", &dest);
    o.spec.output.lineage = true;
    o.job_id = Some(haul_shared::JobId::parse("nightly-lineage").unwrap());
    run(o).await.unwrap();
    let after = now_us().await;
    // the source's columns are as they were, followed by the two lineage columns
    let batches: Vec<_> = read_batches(&dest.0.join("t"))
        .into_iter()
        .map(|b| {
            let names: Vec<_> = b
                .schema()
                .fields()
                .iter()
                .map(|f| f.name().clone())
                .collect();
            assert_eq!(names, ["id", "note", "_haul_job_id", "_haul_extracted_at"]);
            b.project(&[0, 1]).unwrap()
        })
        .collect();
    let digest = assert_same_batches(&db.client, "t", &batches).await;
    assert_eq!(digest.rows, 5000);
    let out = std::process::Command::new(test_python())
        .arg("-c")
        .arg(
            "import sys, pyarrow.dataset as ds, pyarrow.compute as pc\n\
             t = ds.dataset(sys.argv[1], format='parquet').to_table()\n\
             print(t.schema.field('_haul_extracted_at').type)\n\
             print(sorted(set(t['_haul_job_id'].to_pylist())))\n\
             at = t['_haul_extracted_at'].cast('int64')\n\
             print(pc.min(at).as_py(), pc.max(at).as_py())",
        )
        .arg(dest.0.join("t"))
        .output()
        .unwrap();
    assert_success(&out);
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "timestamp[us, tz=UTC]", "{text}");
    assert_eq!(lines[1], "['nightly-lineage']", "{text}");
    let (min, max) = lines[2].split_once(' ').unwrap();
    assert_eq!(min, max, "one snapshot time for every row: {text}");
    let at: i64 = min.parse().unwrap();
    assert!(before <= at && at <= after, "{before} <= {at} <= {after}");

    // a column of a lineage column's name would be shadowed: refused before planning
    let other = TempDest::new();
    db.exec("ALTER TABLE t ADD COLUMN _haul_job_id text").await;
    let mut o = options(&db.dsn, "public.t", &other);
    o.spec.output.lineage = true;
    let err = run(o).await.unwrap_err().to_string();
    assert!(
        err.contains("has a column named _haul_job_id") && err.contains("--columns"),
        "{err}"
    );
    assert!(files_under(&other.0).is_empty(), "nothing written");
}

/// Regression: `time '24:00:00'` was written as 86,400,000,000 µs, outside Parquet's
/// TIME range. It is refused naming the column and the cast; cast, it exports.
#[tokio::test]
async fn a_time_of_24_00_is_refused_with_the_cast_to_pass() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE shifts (id int PRIMARY KEY, ends time);
         INSERT INTO shifts VALUES (1, '17:00'), (2, '24:00:00'), (3, NULL);",
    )
    .await;
    let dest = TempDest::new();
    let e = run(options(&db.dsn, "shifts", &dest))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("24:00:00") && e.contains("--cast ends=text"),
        "{e}"
    );
    assert!(parquet_files(&dest.0.join("shifts")).is_empty());
    let other = TempDest::new();
    let mut o = options(&db.dsn, "shifts", &other);
    o.spec.casts.insert("ends".into(), "text".into());
    let s = run(o).await.unwrap();
    assert_eq!(s.rows, 3);
}

/// Regression: a text key that is not UTF-8 (an SQL_ASCII database) failed planning with
/// the server's "invalid byte sequence" and nothing to do about it; it names the column
/// and the ways to split instead, and `--split ctid` exports it.
#[tokio::test]
async fn a_key_that_is_not_utf8_is_refused_with_the_fix() {
    let db =
        TestDb::with_options("ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
            .await;
    db.exec(
        "CREATE TABLE t (k text PRIMARY KEY, v int);
         INSERT INTO t SELECT E'k\\xff' || g, g FROM generate_series(1, 300) g;",
    )
    .await;
    let n: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM t WHERE get_byte(convert_to(k, 'SQL_ASCII'), 1) = 255",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 300, "the keys hold a byte that is not UTF-8");
    let dest = TempDest::new();
    let mut o = options(&db.dsn, "t", &dest);
    o.spec.chunk_rows = 100;
    let e = run(o).await.unwrap_err().to_string();
    assert!(
        e.contains("\"k\"") && e.contains("--cast k=bytea") && e.contains("--split ctid"),
        "{e}"
    );
    let mut o = options(&db.dsn, "t", &dest);
    o.spec.chunk_rows = 100;
    o.spec.split = haul_shared::jobs::Split::Ctid;
    o.spec.casts.insert("k".into(), "bytea".into());
    let s = run(o).await.unwrap();
    assert_eq!(s.rows, 300);
}
