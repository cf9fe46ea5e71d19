//! A chunk loaded again: the loader's exactly-once rules driven directly over Flight
//! (fenced epochs, replays, replaces), and a replace that takes exactly the rows the
//! earlier attempt wrote, whatever the target's collation.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::{Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use haul_shared::ChunkRange;
use haul_shared::load::{LoadClient, LoadClientError, LoaderOptions, schema_to_ipc};
use haul_shared::proto::wire::{LoadAck, LoadChunk, PrepareLoad};
use haul_shared::proto::{LOAD_VERSION, key_to_wire, range_to_wire};
use haul_shared::range::{KeyColumn, KeyOrdering};
use tokio_util::sync::CancellationToken;

use crate::harness::*;

/// A loader served in this process on a test database, with one job prepared on its
/// table `t`.
struct DirectLoader {
    client: LoadClient,
    addr: SocketAddr,
    job: String,
    schema: SchemaRef,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<Result<(), haul_shared::load::LoadError>>,
}

impl DirectLoader {
    async fn start(tgt: &TestDb, schema: SchemaRef) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let opts = LoaderOptions {
            target: database(&tgt.dsn),
            ledger_schema: "haul".into(),
            token: None,
            tls: None,
            metrics_listen: None,
        };
        let server = tokio::spawn(haul_shared::load::serve(listener, opts, stop.clone()));
        let spec = haul_shared::jobs::LoadSpec {
            endpoints: vec![format!("http://{addr}")],
            target_table: "t".into(),
            create_table: false,
            truncate_first: false,
        };
        let client = LoadClient::new(&spec, &Default::default());
        let job = unique("j");
        let t0 = Instant::now();
        loop {
            let prepared = client
                .prepare(PrepareLoad {
                    version: LOAD_VERSION,
                    job_id: job.clone(),
                    target_table: "t".into(),
                    arrow_schema: schema_to_ipc(&schema).unwrap().to_vec(),
                    create_table: false,
                    truncate_first: false,
                })
                .await;
            match prepared {
                Ok(r) => {
                    assert_eq!(r.target_table, "public.t");
                    break;
                }
                Err(LoadClientError::Unreachable { .. })
                    if t0.elapsed() < Duration::from_secs(10) =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("{e}"),
            }
        }
        Self {
            client,
            addr,
            job,
            schema,
            stop,
            server,
        }
    }

    /// The command loading `chunk` of the job, attempt `epoch` read in `snapshot`.
    fn cmd(
        &self,
        chunk: u32,
        epoch: u64,
        snapshot: &str,
        range: &ChunkRange,
        key: &KeyColumn,
    ) -> LoadChunk {
        LoadChunk {
            version: LOAD_VERSION,
            job_id: self.job.clone(),
            chunk_id: chunk,
            epoch,
            target_table: "t".into(),
            snapshot: snapshot.into(),
            range: Some(range_to_wire(range)),
            key: vec![key_to_wire(key)],
        }
    }

    async fn load(&self, cmd: LoadChunk, b: RecordBatch) -> Result<LoadAck, LoadClientError> {
        let mut l = self.client.start(cmd, Arc::clone(&self.schema)).await?;
        l.send(b).await?;
        l.finish().await
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = self.server.await;
    }
}

fn schema(key: DataType) -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("id", key, false),
        Field::new("note", DataType::Utf8, false),
    ]))
}

/// The loader's exactly-once rules, driven directly: an older epoch is fenced off, a
/// replay in the same snapshot loads nothing, a replay under another snapshot replaces
/// the chunk's rows, and a stream that does not fit the table is refused before any row
/// is loaded.
#[tokio::test]
async fn the_loader_fences_replays_and_replaces() {
    let tgt = TestDb::new().await;
    tgt.exec("CREATE TABLE t (id bigint PRIMARY KEY, note text NOT NULL)")
        .await;
    let schema = schema(DataType::Int64);
    let l = DirectLoader::start(&tgt, Arc::clone(&schema)).await;
    // chunk 0 holds ids [0, 100)
    let range = ChunkRange::Key {
        lower: None,
        upper: Some(vec!["100".into()]),
    };
    let key = KeyColumn {
        name: "id".into(),
        pg_type: "bigint".into(),
        ordering: KeyOrdering::Natural,
    };
    let cmd = |epoch: u64, snapshot: &str| l.cmd(0, epoch, snapshot, &range, &key);
    let batch = |ids: std::ops::Range<i64>, tag: &str| {
        RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(Int64Array::from_iter_values(ids.clone())),
                Arc::new(StringArray::from_iter_values(
                    ids.map(|i| format!("{tag}{i}")),
                )),
            ],
        )
        .unwrap()
    };
    let count = || async {
        let r = tgt
            .client
            .query_one("SELECT count(*), min(note) FROM t", &[])
            .await
            .unwrap();
        (r.get::<_, i64>(0), r.get::<_, Option<String>>(1))
    };

    let ack = l.load(cmd(2, "snap-1"), batch(0..100, "a")).await.unwrap();
    assert_eq!((ack.rows, ack.replayed), (100, false));
    // an older epoch is fenced off, and loads nothing
    let err = l
        .load(cmd(1, "snap-1"), batch(0..100, "z"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("fenced"), "{err}");
    assert_eq!(count().await, (100, Some("a0".into())));
    // a newer attempt in the same snapshot: a replay, nothing loaded again
    let ack = l.load(cmd(3, "snap-1"), batch(0..100, "a")).await.unwrap();
    assert_eq!((ack.rows, ack.replayed), (100, true));
    assert_eq!(count().await, (100, Some("a0".into())));
    // under another snapshot the chunk's rows are replaced, not added to
    let ack = l.load(cmd(4, "snap-2"), batch(0..90, "b")).await.unwrap();
    assert_eq!((ack.rows, ack.replayed), (90, false));
    assert_eq!(count().await, (90, Some("b0".into())));
    // a stream that does not fit the table: refused, naming the column
    let wrong = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("nope", DataType::Utf8, false),
    ]));
    // (under another snapshot, so the delete of the replace is rolled back too)
    let mut up = l
        .client
        .start(cmd(5, "snap-3"), Arc::clone(&wrong))
        .await
        .unwrap();
    let b = RecordBatch::try_new(
        wrong,
        vec![
            Arc::new(Int64Array::from_iter_values(0..3)),
            Arc::new(StringArray::from_iter_values(["x", "y", "z"])),
        ],
    )
    .unwrap();
    let err = match up.send(b).await {
        Err(e) => e,
        Ok(()) => up.finish().await.unwrap_err(),
    };
    assert!(err.to_string().contains("no column \"nope\""), "{err}");
    assert_eq!(count().await, (90, Some("b0".into())));
    // regression: the key's type came from the request, spliced into the replace's
    // DELETE (`bigint OR true` emptied the table, other chunks' rows too); the target's
    // own type, from its catalog, is used
    tgt.exec("INSERT INTO t SELECT g, 'other' || g FROM generate_series(100, 199) g")
        .await;
    let mut hostile = cmd(6, "snap-4");
    hostile.key[0].pg_type = "bigint OR true".into();
    let ack = l.load(hostile, batch(0..80, "c")).await.unwrap();
    assert_eq!((ack.rows, ack.replayed), (80, false));
    let r = tgt
        .client
        .query_one(
            "SELECT count(*) FILTER (WHERE note LIKE 'other%'), count(*) FROM t",
            &[],
        )
        .await
        .unwrap();
    assert_eq!((r.get::<_, i64>(0), r.get::<_, i64>(1)), (100, 180));
    // regression: a stream that ended cleanly mid-chunk (a worker that stopped sending
    // without a reset) was committed; without the chunk's end nothing is, whatever came
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", l.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut raw = arrow_flight::FlightClient::new(channel);
    let data = arrow_flight::encode::FlightDataEncoderBuilder::new()
        .with_schema(Arc::clone(&schema))
        .with_flight_descriptor(Some(arrow_flight::FlightDescriptor::new_cmd(
            prost::Message::encode_to_vec(&cmd(7, "snap-5")),
        )))
        .build(futures::stream::iter([Ok(batch(0..10, "d"))]));
    let refused = match raw.do_put(data).await {
        Err(e) => e.to_string(),
        Ok(mut results) => match futures::StreamExt::next(&mut results).await {
            Some(Err(e)) => e.to_string(),
            other => panic!("a chunk without its end was committed: {other:?}"),
        },
    };
    assert!(refused.contains("without the chunk's end"), "{refused}");
    assert_eq!(count().await.0, 180, "nothing of it committed");
    l.stop().await;
}

/// A replace takes exactly the rows the earlier attempt's transaction wrote. Regression:
/// it deleted the chunk's key range compared in the *target's* collation, so with a text
/// key cut in byte order and a target under ICU (`a < B` there, `B < a` in the source)
/// reloading the lowercase chunk deleted the uppercase chunk too; and rows in the range
/// that were not the job's (an append into a table holding data) went with them.
#[tokio::test]
async fn a_replace_takes_exactly_the_rows_its_attempt_wrote() {
    let tgt = TestDb::new().await;
    tgt.exec(r#"CREATE TABLE t (id text COLLATE "und-x-icu" PRIMARY KEY, note text NOT NULL)"#)
        .await;
    // the ledger as an older haul made it (no xid): the loader adds the column
    tgt.exec(
        "CREATE SCHEMA haul;
         CREATE TABLE haul.load_jobs (job_id text PRIMARY KEY, target_oid oid NOT NULL,
            target_table text NOT NULL, created boolean NOT NULL, truncated boolean NOT NULL,
            prepared_at timestamptz NOT NULL DEFAULT now());
         CREATE TABLE haul.load_chunks (job_id text NOT NULL, chunk_id integer NOT NULL,
            epoch bigint NOT NULL, snapshot text NOT NULL, rows bigint NOT NULL,
            committed_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (job_id, chunk_id));",
    )
    .await;
    let schema = schema(DataType::Utf8);
    let l = DirectLoader::start(&tgt, Arc::clone(&schema)).await;
    // cut in the source's byte order: chunk 0 is the uppercase keys, chunk 1 the lowercase
    let upper = ChunkRange::Key {
        lower: None,
        upper: Some(vec!["a".into()]),
    };
    let lower = ChunkRange::Key {
        lower: Some(vec!["a".into()]),
        upper: None,
    };
    let key = |ordering| KeyColumn {
        name: "id".into(),
        pg_type: "text".into(),
        ordering,
    };
    let linguistic = key(KeyOrdering::Collation("en_US.utf8".into()));
    let bytes = key(KeyOrdering::Bytes);
    let batch = |first: u8, n: u8, tag: &str| {
        let ids: Vec<String> = (first..first + n)
            .map(|c| (c as char).to_string())
            .collect();
        RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(StringArray::from_iter_values(ids.iter())),
                Arc::new(StringArray::from_iter_values(
                    ids.iter().map(|i| format!("{tag}{i}")),
                )),
            ],
        )
        .unwrap()
    };
    let count = |filter: &'static str| {
        let c = &tgt.client;
        async move {
            c.query_one(&format!("SELECT count(*) FROM t WHERE {filter}"), &[])
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    l.load(
        l.cmd(0, 1, "snap-1", &upper, &linguistic),
        batch(b'A', 26, "s1"),
    )
    .await
    .unwrap();
    l.load(
        l.cmd(1, 1, "snap-1", &lower, &linguistic),
        batch(b'a', 26, "s1"),
    )
    .await
    .unwrap();
    assert_eq!(count("true").await, 52);

    // the lowercase chunk again, under another snapshot, one row fewer: the uppercase
    // chunk is untouched (the target's `id >= 'a'` holds 'B'..'Z' too)
    let ack = l
        .load(
            l.cmd(1, 2, "snap-2", &lower, &linguistic),
            batch(b'a', 25, "s2"),
        )
        .await
        .unwrap();
    assert_eq!((ack.rows, ack.replayed), (25, false));
    assert_eq!(count("note LIKE 's1%'").await, 26, "the uppercase chunk");
    assert_eq!(count("note LIKE 's2%'").await, 25);
    assert_eq!(count("true").await, 51);

    // a row in chunk 0's range that is not the job's (appended by someone else), and a
    // key in byte order, so the range narrows the replace under COLLATE "C": the replace
    // takes the attempt's 26 rows and leaves the stranger
    tgt.exec("INSERT INTO t VALUES ('B-user', 'user')").await;
    let ack = l
        .load(l.cmd(0, 3, "snap-3", &upper, &bytes), batch(b'A', 24, "s3"))
        .await
        .unwrap();
    assert_eq!((ack.rows, ack.replayed), (24, false));
    assert_eq!(count("note = 'user'").await, 1, "the stranger stays");
    assert_eq!(count("note LIKE 's1%'").await, 0);
    assert_eq!(count("note LIKE 's3%'").await, 24);
    assert_eq!(count("true").await, 24 + 25 + 1);

    // a row of the attempt changed in the target since: the replace cannot be exact, so
    // it refuses, and nothing of it commits
    tgt.exec("UPDATE t SET note = 'edited' WHERE id = 'b'")
        .await;
    let err = l
        .load(
            l.cmd(1, 4, "snap-4", &lower, &linguistic),
            batch(b'a', 26, "s4"),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("found 24 of the 25 rows"), "{err}");
    assert!(err.contains("truncate public.t and rerun"), "{err}");
    assert_eq!(count("true").await, 50);
    assert_eq!(count("note LIKE 's4%'").await, 0);

    // a chunk of pages (a table without a key): once refused, now replaced exactly too
    let pages = ChunkRange::Ctid {
        first_page: 0,
        end_page: None,
    };
    l.load(
        l.cmd(2, 1, "snap-1", &pages, &linguistic),
        batch(b'0', 10, "p1"),
    )
    .await
    .unwrap();
    l.load(
        l.cmd(2, 2, "snap-2", &pages, &linguistic),
        batch(b'0', 9, "p2"),
    )
    .await
    .unwrap();
    assert_eq!(count("note LIKE 'p1%'").await, 0);
    assert_eq!(count("note LIKE 'p2%'").await, 9);
    assert_eq!(count("true").await, 59);
    l.stop().await;
}
