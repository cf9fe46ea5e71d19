//! The medallion example (`examples/medallion`) as users run it, on the real Postgres and
//! the real dbt, Prefect, Dagster and Airflow (venvs made by `scripts/pipeline-tools.sh`):
//! silver and gold are checked against the source by the example's own `check.py` after
//! every run, and its checks are shown to fail when they should.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::harness::*;

fn example(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/medallion")
        .join(file)
}

fn venvs() -> PathBuf {
    PathBuf::from(
        std::env::var("HAUL_TEST_VENVS")
            .expect("HAUL_TEST_VENVS is unset: run the suite with scripts/test.sh"),
    )
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn ok(out: Output, what: &str) -> String {
    assert!(out.status.success(), "{what} failed:\n{}", text(&out));
    String::from_utf8(out.stdout).unwrap()
}

/// Drops the example's source database at the end, pass or fail.
struct DropDb(String);

impl Drop for DropDb {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .arg(admin_dsn())
            .args(["-X", "-q", "-c"])
            .arg(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                haul_shared::pg::quote_ident(&self.0)
            ))
            .output();
    }
}

/// The settings every step of the pipeline reads.
struct Pipeline {
    source: String,
    work: PathBuf,
    venvs: PathBuf,
}

impl Pipeline {
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        c.env("HAUL_SOURCE", &self.source)
            .env("HAUL_LAKE", self.work.join("lake"))
            .env("WAREHOUSE", self.work.join("warehouse.duckdb"))
            .env("HAUL", haul_bin())
            .env("DBT", self.venvs.join("dbt/bin/dbt"))
            .env("HAUL_LOG", "warn")
            .env_remove("HAUL_COORDINATOR");
        c
    }

    fn step(&self, name: &str) -> Output {
        self.command(example("pipeline.sh"))
            .arg(name)
            .output()
            .unwrap()
    }

    /// The example's own check: silver = the source's orders, gold = its aggregation.
    fn check(&self) -> String {
        let out = Command::new(self.venvs.join("dbt/bin/python"))
            .arg(example("check.py"))
            .arg(self.work.join("warehouse.duckdb"))
            .arg(&self.source)
            .output()
            .unwrap();
        ok(out, "check.py")
    }

    /// The source moves on between two runs (`changes.sql`).
    fn change_source(&self) {
        let out = Command::new("psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-v", "new_rows=300"])
            .arg(&self.source)
            .arg("-f")
            .arg(example("changes.sql"))
            .output()
            .unwrap();
        ok(out, "changes.sql");
    }

    fn psql(&self, sql: &str) {
        let out = Command::new("psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1"])
            .arg(&self.source)
            .args(["-c", sql])
            .output()
            .unwrap();
        ok(out, sql);
    }
}

#[tokio::test]
async fn the_medallion_example_runs_under_dbt_prefect_dagster_and_airflow() {
    let _broker = BROKER.write().await;
    let venvs = venvs();
    let db = unique("haul_medallion");
    let _drop = DropDb(db.clone());
    let work = TempDest::new();

    // run.sh: the source, two runs (full, then an increment), each checked, freshness
    let out = Command::new("bash")
        .arg(example("run.sh"))
        .env("ROWS", "20000")
        .env("MEDALLION_DB", &db)
        .env("MEDALLION_DIR", &work.0)
        .env("PGADMIN", admin_dsn())
        .env("HAUL", haul_bin())
        .env("DBT", venvs.join("dbt/bin/dbt"))
        .env("HAUL_LOG", "warn")
        .output()
        .unwrap();
    let all = text(&out);
    assert!(out.status.success(), "run.sh failed:\n{all}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let last: Vec<&str> = stdout.lines().rev().take(2).collect();
    let source = last[1].strip_prefix("source: ").expect(&stdout).to_owned();
    let warehouse = last[0].strip_prefix("warehouse: ").expect(&stdout);
    assert!(source.ends_with(&format!("/{db}")), "{source}");
    assert_eq!(Path::new(warehouse), work.0.join("warehouse.duckdb"));
    // both runs were checked, the second one read only the changed rows
    assert_eq!(
        all.matches("check: silver.orders = the source's").count(),
        2,
        "{all}"
    );
    assert!(all.contains("the source's 20000 orders"), "{all}");
    assert!(all.contains("bronze is fresh"), "{all}");
    let p = Pipeline {
        source,
        work: work.0.clone(),
        venvs: venvs.clone(),
    };

    // the freshness check fails when bronze is stale: the same rows, extracted 3 days ago
    let stale = work.0.join("stale");
    std::fs::create_dir_all(&stale).unwrap();
    let sql = format!(
        "COPY (SELECT * REPLACE (_haul_extracted_at - INTERVAL 3 DAY AS _haul_extracted_at) \
         FROM read_parquet('{}/orders/**/part-*.parquet', hive_partitioning = true)) \
         TO '{}/orders' (FORMAT parquet, PARTITION_BY (dt), FILENAME_PATTERN 'part-{{i}}')",
        work.0.join("lake").display(),
        stale.display()
    );
    let out = Command::new(venvs.join("dbt/bin/python"))
        .args(["-c", "import duckdb, sys; duckdb.sql(sys.argv[1])", &sql])
        .output()
        .unwrap();
    ok(out, "making a stale bronze");
    let out = p
        .command(example("pipeline.sh"))
        .arg("freshness")
        .env("HAUL_LAKE", &stale)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "stale bronze passed:\n{}",
        text(&out)
    );
    assert!(text(&out).contains("ERROR STALE"), "{}", text(&out));

    // Prefect: a nightly run after the source moved on
    p.change_source();
    let out = p
        .command(venvs.join("prefect/bin/python"))
        .arg(example("orchestrators/prefect_flow.py"))
        .env("PREFECT_HOME", work.0.join("prefect"))
        .env("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        // its temporary API server's first start (a fresh database) can take over the
        // default 20 s on a loaded 2-core machine
        .env("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
        .output()
        .unwrap();
    let printed = ok(out, "the Prefect flow");
    let bronze: serde_json::Value = serde_json::from_str(printed.lines().last().unwrap()).unwrap();
    assert!(bronze["rows"].as_u64().unwrap() > 300, "{bronze}");
    p.check();

    // Dagster, with bronze extracted by a cluster (`haul submit --wait`)
    p.change_source();
    let mut cl = Cluster::new(None);
    cl.start_worker("w1", &[]);
    cl.wait_workers(1);
    let dagster_home = work.0.join("dagster");
    std::fs::create_dir_all(&dagster_home).unwrap();
    let out = p
        .command(venvs.join("dagster/bin/dagster"))
        .args(["asset", "materialize", "--select", "*", "-f"])
        .arg(example("orchestrators/dagster_assets.py"))
        .env("DAGSTER_HOME", &dagster_home)
        .env("HAUL_COORDINATOR", &cl.url)
        .output()
        .unwrap();
    let log = text(&out);
    assert!(
        out.status.success(),
        "Dagster failed:\n{log}\n{}",
        cl.logs()
    );
    assert!(log.contains("RUN_SUCCESS"), "{log}");
    assert!(
        log.matches("ASSET_MATERIALIZATION").count() >= 2,
        "both assets materialized: {log}"
    );
    assert!(
        cl.haul_ok(&["jobs"]).contains("succeeded"),
        "bronze went through the cluster"
    );
    p.check();
    drop(cl);
    // the bronze asset's materialization carries haul's job and row count
    let out = Command::new(venvs.join("dagster/bin/python"))
        .args([
            "-c",
            "from dagster import AssetKey, DagsterInstance\n\
             e = DagsterInstance.get().get_latest_materialization_event(AssetKey('bronze_orders'))\n\
             m = e.asset_materialization.metadata\n\
             print(m['haul_job_id'].value, m['rows'].value)",
        ])
        .env("DAGSTER_HOME", &dagster_home)
        .output()
        .unwrap();
    let printed = ok(out, "reading the Dagster asset's metadata");
    let (dagster_job, dagster_rows) = printed.lines().last().unwrap().split_once(' ').unwrap();
    let (dagster_job, dagster_rows) = (dagster_job.to_owned(), dagster_rows.to_owned());

    // Airflow: `airflow dags test` after the source moved on again
    p.change_source();
    let airflow = |args: &[&str]| {
        p.command(venvs.join("airflow/bin/airflow"))
            .args(args)
            .env("AIRFLOW_HOME", work.0.join("airflow"))
            .env(
                "AIRFLOW__CORE__DAGS_FOLDER",
                example("orchestrators").canonicalize().unwrap(),
            )
            .env("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
            .output()
            .unwrap()
    };
    ok(airflow(&["db", "migrate"]), "airflow db migrate");
    let out = airflow(&["dags", "test", "medallion_nightly"]);
    let log = text(&out);
    assert!(out.status.success(), "airflow dags test failed:\n{log}");
    assert!(log.contains("state=success"), "{log}");
    p.check();

    // a bad row in the source: bronze copies it exactly, the silver tests refuse it
    p.psql(
        "INSERT INTO public.orders (user_id, tenant_id, status, total_cents, currency, created_at)
         VALUES (1, 1, 'lost', 900000000000, 'usd', now())",
    );
    ok(p.step("extract"), "extract");
    let out = p.step("transform");
    let log = text(&out);
    assert!(!out.status.success(), "dbt passed a bad row:\n{log}");
    assert!(
        log.contains("between_orders_total_usd") && log.contains("accepted_values_orders_status"),
        "{log}"
    );

    // `haul ls` shows bronze's lineage: six increments (run.sh's two, Prefect's, Dagster's,
    // Airflow's, the bad row's), each window starting where the one before ended
    let out = Command::new(haul_bin())
        .arg("ls")
        .arg(work.0.join("lake"))
        .arg("--json")
        .output()
        .unwrap();
    let jobs: Vec<serde_json::Value> = ok(out, "haul ls")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(jobs.len(), 6, "{jobs:?}");
    assert!(
        jobs.iter()
            .all(|j| j["state"] == "committed" && j["table"] == "public.orders")
    );
    assert!(
        jobs[0].get("window_low").is_none(),
        "the first takes everything"
    );
    for w in jobs.windows(2) {
        assert_eq!(w[1]["window_low"], w[0]["window_high"], "{jobs:?}");
    }
    let dagsters = jobs.iter().find(|j| j["job_id"] == dagster_job.as_str());
    assert_eq!(
        dagsters.map(|j| j["rows"].to_string()),
        Some(dagster_rows),
        "the asset's row count is its job's: {jobs:?}"
    );
}
