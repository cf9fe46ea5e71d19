//! `haul plan`, `haul show`, `haul verify` and `haul gc`: a job looked at before it runs,
//! a lake's table described, an export reconciled with its source, and a lake's garbage
//! collected — each run as the binary a user runs.

use std::path::Path;
use std::process::{Command, Output};

use crate::harness::*;

fn haul(args: &[&str]) -> Output {
    Command::new(haul_bin()).args(args).output().unwrap()
}

fn stdout_json(out: &Output) -> serde_json::Value {
    assert_success(out);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// Every file under `dir`, relative to it, sorted.
fn tree(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = files_under(dir)
        .iter()
        .map(|p| p.strip_prefix(dir).unwrap().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// `haul plan` plans the job `haul run` would run — the same chunks — and asks the
/// source about each chunk's query, writing nothing; then the run it described commits
/// exactly those chunks.
#[tokio::test]
async fn plan_shows_the_chunks_a_run_makes_and_writes_nothing() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE t (id bigint PRIMARY KEY, v text);
         INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 30000) g; ANALYZE t;",
    )
    .await;
    let dest = TempDest::new();
    let url = dest.url();
    let args = [
        "--source",
        &db.dsn,
        "--table",
        "t",
        "--dest",
        &url,
        "--job-id",
        "planned",
        "--chunk-rows",
        "5000",
        "--workers",
        "2",
    ];
    let out = haul(&[&["plan"], &args[..], &["--json"]].concat());
    let plan = stdout_json(&out);
    assert_eq!(plan["job_id"], "planned");
    assert_eq!(plan["split"], "key");
    assert_eq!(plan["key"][0], "\"id\" bigint");
    assert_eq!(plan["estimated_rows"], 30000);
    let chunks = plan["chunks"].as_array().unwrap();
    assert!(chunks.len() >= 6, "{plan}");
    // the planner's estimates of the chunks add up to about the table
    let est: u64 = chunks
        .iter()
        .map(|c| c["estimated_rows"].as_u64().unwrap())
        .sum();
    assert!((24_000..=36_000).contains(&est), "{est}");
    for c in chunks {
        assert!(!c["scan"].as_str().unwrap().is_empty(), "{c}");
        let st = c["statement"].as_str().unwrap();
        assert!(
            st.starts_with("COPY (SELECT \"id\", \"v\" FROM \"public\".\"t\" WHERE "),
            "{st}"
        );
    }
    assert!(tree(&dest.0).is_empty(), "a plan wrote {:?}", tree(&dest.0));

    // the text form, through `run --dry-run`
    let out = haul(&[&["run", "--dry-run"], &args[..]].concat());
    assert_success(&out);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with("dry run of job planned: nothing was read or written"),
        "{text}"
    );
    assert!(
        text.contains("split:     key ranges on \"id\" bigint"),
        "{text}"
    );
    assert!(tree(&dest.0).is_empty());

    // the run commits the chunks the plan showed, range for range
    let out = haul(&[&["run", "--progress", "none"], &args[..]].concat());
    assert_success(&out);
    let mut done = chunk_manifests(&dest, "planned");
    done.sort_by_key(|c| c.chunk);
    assert_eq!(done.len(), chunks.len());
    for (m, c) in done.iter().zip(chunks) {
        let key = vec![haul_shared::range::KeyColumn {
            name: "id".into(),
            pg_type: "bigint".into(),
            ordering: haul_shared::range::KeyOrdering::Natural,
        }];
        assert_eq!(m.range.predicate(&key), c["range"].as_str().unwrap());
    }
    // and a plan of the done job says so
    let again = stdout_json(&haul(&[&["plan"], &args[..], &["--json"]].concat()));
    assert_eq!(again["already_done"], true, "{again}");
}

/// `haul show <lake>/<table>`: the committed export (rows, files, partitions, columns with
/// both types) and the table's jobs; a table nobody wrote is refused in one line.
#[tokio::test]
async fn show_describes_a_tables_export_and_jobs() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE t (id int PRIMARY KEY, amount numeric(10,2), at date NOT NULL);
         INSERT INTO t SELECT g, g / 100.0, date '2024-01-01' + g % 3 FROM generate_series(1, 3000) g;",
    )
    .await;
    let dest = TempDest::new();
    let mut o = options(&db.dsn, "t", &dest);
    o.job_id = Some(haul_shared::JobId::parse("shown").unwrap());
    o.spec.output.partition_by = Some(haul_shared::jobs::PartitionBy::new(
        "at",
        haul_shared::jobs::Granularity::Day,
    ));
    run(o).await.unwrap();
    let table = format!("{}/t", dest.0.display());
    let v = stdout_json(&haul(&["show", &table, "--json"]));
    assert_eq!(v["export"]["job"], "shown");
    assert_eq!(v["export"]["rows"], 3000);
    let cols: Vec<(&str, &str)> = v["export"]["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap(),
                c["arrow_type"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        cols,
        [
            ("id", "Int32"),
            ("amount", "Decimal128(10, 2)"),
            ("at", "Date32")
        ]
    );
    let parts: Vec<(&str, u64)> = v["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["partition"].as_str().unwrap(),
                p["rows"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        parts,
        [
            ("dt=2024-01-01", 1000),
            ("dt=2024-01-02", 1000),
            ("dt=2024-01-03", 1000)
        ]
    );
    assert_eq!(v["jobs"][0]["job_id"], "shown");
    assert_eq!(v["jobs"][0]["state"], "committed");

    let out = haul(&["show", &table]);
    assert_success(&out);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("export:    job shown, committed"), "{text}");
    assert!(
        text.contains("partition: at by day: 3 folders, dt=2024-01-01 .. dt=2024-01-03"),
        "{text}"
    );
    assert!(
        text.contains("amount") && text.contains("Decimal128(10, 2)"),
        "{text}"
    );

    // a table whose name is not a folder name: named either way
    db.exec(
        "CREATE TABLE \"Odd Name\" (id int PRIMARY KEY); INSERT INTO \"Odd Name\" VALUES (1), (2);",
    )
    .await;
    run(options(&db.dsn, "\"Odd Name\"", &dest)).await.unwrap();
    for named in ["Odd Name", "Odd_Name"] {
        let v = stdout_json(&haul(&[
            "show",
            &format!("{}/{named}", dest.0.display()),
            "--json",
        ]));
        assert_eq!(v["export"]["rows"], 2, "{named}: {v}");
    }

    let out = haul(&["show", &format!("{}/nope", dest.0.display())]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no table nope in") && err.lines().count() == 1,
        "{err}"
    );
}

/// `haul verify` reads an export back and reconciles it with the source chunk by chunk:
/// identical on a many-typed table (NULLs, NaN, infinities, arrays, intervals, padded
/// char, partitioned, with lineage columns); after the source changes it exits 1 naming
/// the chunk whose checksum differs (same count) and the chunk that lost a row; a part
/// of the export tampered with is caught too.
#[tokio::test]
async fn verify_reconciles_an_export_with_its_source() {
    let db = TestDb::new().await;
    db.exec(
        "CREATE TABLE t (
           id bigint PRIMARY KEY, b bool, i2 smallint, i4 int, f4 real, f8 double precision,
           n numeric(12,3), nn numeric(30,0), tx text, c char(5), j jsonb, by bytea, d date,
           tm time, ts timestamp, tz timestamptz, iv interval, u uuid, arr int[], tarr text[],
           o oid);
         INSERT INTO t SELECT g, g % 3 = 0, (g % 1000)::smallint, g * 7,
           CASE WHEN g = 5 THEN 'NaN'::real ELSE g / 3.0 END,
           CASE WHEN g = 6 THEN '-0'::float8 WHEN g = 7 THEN 'Infinity' ELSE g * 1.1 END,
           g / 7.0, g::numeric * 1000000000000, CASE WHEN g % 10 = 0 THEN NULL ELSE 'row ' || g || ' é' END,
           'ab', jsonb_build_object('g', g, 'k', ARRAY[1, 2]), decode(md5(g::text), 'hex'),
           CASE WHEN g = 8 THEN 'infinity'::date WHEN g = 9 THEN '-infinity' ELSE date '2020-01-01' + g % 40 END,
           time '01:02:03.456789' + g * interval '1 second',
           timestamp '2024-02-29 12:00:00.000001' + g * interval '1 minute',
           CASE WHEN g = 11 THEN 'infinity'::timestamptz ELSE timestamptz '2024-01-01 00:00:00+00' + g * interval '1 hour' END,
           make_interval(months => g % 13, days => g % 31, secs => g / 1000.0),
           md5(g::text)::uuid,
           CASE WHEN g % 4 = 0 THEN NULL WHEN g % 4 = 1 THEN '{}'::int[] ELSE ARRAY[g, NULL, -g] END,
           ARRAY['a', NULL, 'b' || g], g::oid
         FROM generate_series(1, 12000) g; ANALYZE t;",
    )
    .await;
    let dest = TempDest::new();
    let mut o = options(&db.dsn, "t", &dest);
    o.spec.chunk_rows = 2000;
    o.spec.output.lineage = true;
    o.spec.output.partition_by = Some(haul_shared::jobs::PartitionBy::new(
        "d",
        haul_shared::jobs::Granularity::Month,
    ));
    run(o).await.unwrap();
    let table = format!("{}/t", dest.0.display());
    let verify = |json: bool| {
        let mut a = vec!["verify", &table, "--source", &db.dsn];
        if json {
            a.push("--json");
        }
        haul(&a)
    };
    let out = verify(false);
    assert_success(&out);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("identical to the source: 12,000 rows in"),
        "{text}"
    );
    let v = stdout_json(&verify(true));
    assert_eq!(v["identical"], true);
    assert_eq!(
        v["columns"].as_array().unwrap().len(),
        21,
        "lineage columns are haul's, not the source's"
    );
    let nchunks = v["chunks"].as_array().unwrap().len();
    assert!(nchunks >= 5, "{v}");

    // a part of the export overwritten with another part: caught, then put back
    let mut parts = parquet_files(&dest.0.join("t"));
    parts.sort();
    let kept = std::fs::read(&parts[1]).unwrap();
    std::fs::copy(&parts[0], &parts[1]).unwrap();
    let out = verify(true);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // (regression: read at the manifest's size, the rewritten part was "Corrupt footer"
    // and the run printed no report; it is read as it is now, and differs)
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["identical"], false, "{v}");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("footer"));
    // a part deleted: its chunk's finding, in the report (regression: an object-store
    // error ended the verification with no report)
    std::fs::remove_file(&parts[1]).unwrap();
    let out = verify(true);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let missing: Vec<_> = v["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["problem"].as_str().is_some_and(|p| p.contains("missing")))
        .collect();
    assert_eq!(missing.len(), 1, "{v}");
    let text = String::from_utf8(verify(false).stdout).unwrap();
    assert!(
        text.contains("export unreadable") && text.contains("missing"),
        "{text}"
    );
    std::fs::write(&parts[1], kept).unwrap();
    assert_success(&verify(false));

    // one value changed, one row gone: two chunks differ, named with their ranges
    db.exec("UPDATE t SET iv = iv + interval '1 microsecond' WHERE id = 100; DELETE FROM t WHERE id = 11000;")
        .await;
    let out = verify(true);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let differ: Vec<&serde_json::Value> = v["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["identical"] == false)
        .collect();
    assert_eq!(differ.len(), 2, "{v}");
    assert_eq!(differ[0]["source_rows"], differ[0]["export_rows"]);
    assert_ne!(differ[0]["source_checksum"], differ[0]["export_checksum"]);
    assert_eq!(
        differ[1]["export_rows"].as_u64().unwrap(),
        differ[1]["source_rows"].as_u64().unwrap() + 1
    );
    let out = verify(false);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("differs from the source in 2 of"), "{text}");
    assert!(text.contains("checksums differ; rows where"), "{text}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("verification failed"));
}

/// `haul gc` finds what no manifest needs — a committed job's leftover staging, an
/// uncommitted attempt's parts, a replaced export's part, a part no manifest lists —
/// lists it without `--delete`, leaves young objects and other folders alone, and never
/// touches records or the staged parts a failed job's committed chunks need: after a
/// collection the failed job resumes to an exact export.
#[tokio::test]
async fn gc_collects_only_what_no_manifest_needs() {
    let db = TestDb::new().await;
    poisonable(&db, 10_000, 5_000, "22023").await;
    db.exec("CREATE TABLE u AS SELECT g AS id, g * 2 AS v FROM generate_series(1, 3000) g")
        .await;
    let dest = TempDest::new();
    run(poisoned_run(&db, &dest, "gc-failed"))
        .await
        .unwrap_err();
    for (job, overwrite) in [("gc-first", false), ("gc-second", true)] {
        let mut o = options(&db.dsn, "public.u", &dest);
        o.job_id = Some(haul_shared::JobId::parse(job).unwrap());
        o.overwrite = overwrite;
        run(o).await.unwrap();
    }
    let lake = dest.0.clone();
    let put = |rel: &str, bytes: &[u8]| {
        let p = lake.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    };
    // a part of the replaced export, back (its removal was cut short)
    let first: serde_json::Value = serde_json::from_slice(
        &std::fs::read(lake.join("_haul/jobs/gc-first/_manifest.json")).unwrap(),
    )
    .unwrap();
    let replaced = first["files"][0]["path"].as_str().unwrap().to_owned();
    let second_part = parquet_files(&lake.join("u"))[0].clone();
    put(&replaced, &std::fs::read(&second_part).unwrap());
    put(
        "_haul/staging/gc-second/000000/9/part-zombie.parquet",
        b"zombie",
    );
    put(
        "_haul/staging/gc-failed/000001/9/part-crashed.parquet",
        b"crashed",
    );
    put("u/part-orphan.parquet", b"orphan");
    put("notmine/x.parquet", b"not haul's");
    let records_before = tree(&lake.join("_haul/jobs"));
    let staged_kept: Vec<String> = chunk_manifests(&dest, "gc-failed")
        .iter()
        .flat_map(|c| c.files.iter().map(|f| f.staged.clone()))
        .collect();
    assert!(!staged_kept.is_empty());
    let tree_before = tree(&lake);

    let listed = |v: &serde_json::Value| -> Vec<String> {
        let mut p: Vec<String> = v["objects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["path"].as_str().unwrap().to_owned())
            .collect();
        p.sort();
        p
    };
    let d = lake.to_str().unwrap();
    // the default grace period: only what committed manifests prove to be garbage
    let v = stdout_json(&haul(&["gc", d, "--json"]));
    assert_eq!(
        listed(&v),
        [
            "_haul/staging/gc-second/000000/9/part-zombie.parquet".to_owned(),
            replaced.clone()
        ]
    );
    assert_eq!(v["too_young"], 2, "{v}");
    assert_eq!(v["removed"], false);
    assert_eq!(tree(&lake), tree_before, "a dry run removed something");

    let v = stdout_json(&haul(&["gc", d, "--older-than", "0", "--json"]));
    let mut want = vec![
        "_haul/staging/gc-failed/000001/9/part-crashed.parquet".to_owned(),
        "_haul/staging/gc-second/000000/9/part-zombie.parquet".to_owned(),
        replaced.clone(),
        "u/part-orphan.parquet".to_owned(),
    ];
    want.sort();
    assert_eq!(listed(&v), want);
    assert_eq!(tree(&lake), tree_before);

    let out = haul(&["gc", d, "--older-than", "0", "--delete"]);
    assert_success(&out);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("removed 4 objects"), "{text}");
    for w in &want {
        assert!(!lake.join(w).exists(), "{w} is still there");
    }
    assert!(lake.join("notmine/x.parquet").exists());
    assert_eq!(tree(&lake.join("_haul/jobs")), records_before);
    for s in &staged_kept {
        assert!(
            lake.join(s).exists(),
            "{s}, a committed chunk's part, was removed"
        );
    }
    let out = haul(&["gc", d, "--older-than", "0"]);
    assert!(
        String::from_utf8(out.stdout)
            .unwrap()
            .contains("nothing to collect")
    );

    // the failed job resumes from the parts gc kept, and both exports are exact
    db.exec("DELETE FROM poison").await;
    let mut o = poisoned_run(&db, &dest, "gc-failed");
    o.resume = true;
    o.fresh_snapshot = true;
    run(o).await.unwrap();
    for table in ["t", "u"] {
        let out = haul(&["verify", &format!("{d}/{table}"), "--source", &db.dsn]);
        assert_success(&out);
    }
}
