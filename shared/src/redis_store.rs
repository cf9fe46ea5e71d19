//! Redis implementations of [`LeaseStore`] and [`JobStore`], for the cluster.
//!
//! Keys, all under a configurable prefix (default `haul:`):
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `<p>lease:<key>` | string, with TTL | `<holder>\|<epoch>` of the current lease |
//! | `<p>epoch:<key>` | counter | the last epoch handed out for `<key>` (never expires) |
//! | `<p>epoch-floor` | integer | every epoch is above it: the server's clock (µs) when it was set, so a Redis that lost its data hands out later epochs than before |
//! | `<p>jobs` | set | job ids |
//! | `<p>job:<id>` | string | the job record (JSON), without its state |
//! | `<p>job:<id>:state` | string | the job's state (JSON) |
//! | `<p>job:<id>:chunks` | hash | chunk id → chunk state (JSON) |
//! | `<p>job:<id>:dlq` | hash | chunk id → its dead letter ([`DeadLetter`], JSON) |
//! | `<p>workers` | hash | worker id → its last heartbeat ([`WorkerRecord`], JSON) |
//! | `<p>drains` | hash | worker id → the drain order left for it ([`DrainOrder`], JSON) |
//!
//! The coordinator's own lease (one active coordinator per prefix) is the lease `coordinator`.
//!
//! Lease operations are Lua scripts, so each is atomic on the server; expiry is the
//! server's clock.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};

use crate::jobs::{ChunkState, DeadLetter, JobRecord, JobState, JobStore};
use crate::lease::{Lease, LeaseStore, StoreError};
use crate::links::LinkTls;
use crate::workers::{DrainOrder, WorkerRecord};
use crate::{ChunkId, Epoch, JobId, WorkerId};

// The epoch is the key's counter's next value, above the prefix's epoch floor: the
// server's clock in µs when the floor was first needed. A Redis that lost its data
// (FLUSHALL, a failover to an empty replica) sets a new, later floor, so it never hands
// out an epoch older than one already fenced with (a key's epochs stay below the µs that
// pass between two floors).
const ACQUIRE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local floor = redis.call('GET', KEYS[3])
if not floor then
  local t = redis.call('TIME')
  floor = string.format('%d', tonumber(t[1]) * 1000000 + tonumber(t[2]))
  redis.call('SET', KEYS[3], floor)
end
floor = tonumber(floor)
local e = redis.call('INCR', KEYS[2])
if e <= floor then
  e = floor + 1
  redis.call('SET', KEYS[2], string.format('%d', e))
end
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. string.format('%d', e), 'PX', ARGV[2])
return e";

const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0";

// A committed chunk stays committed (see the JobStore contract).
const SET_CHUNK: &str = r#"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and string.find(cur, '"state":"committed"', 1, true)
   and not string.find(ARGV[2], '"state":"committed"', 1, true) then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1"#;

// Deletes the lease if ARGV[1] holds it: the value is `<holder>|<epoch>`, and holder ids
// may contain `|` (the epoch never does), as `holder` reads it.
const EVICT: &str = r"
local v = redis.call('GET', KEYS[1])
if v and string.match(v, '^(.*)|%d+$') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0";

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0";

/// Lease and job state in Redis. Cheap to clone (one multiplexed, reconnecting connection).
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
}

fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn corrupt(key: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    }
}

impl RedisStore {
    /// Connects to `url` (`redis://host:port/db`); all keys go under `prefix`.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, StoreError> {
        Self::connect_with_tls(url, prefix, &LinkTls::default()).await
    }

    /// As [`RedisStore::connect`]; a `rediss://` URL trusts `tls.ca` (else the system's
    /// CAs) and presents `tls.cert`/`tls.key` when given.
    pub async fn connect_with_tls(
        url: &str,
        prefix: &str,
        tls: &LinkTls,
    ) -> Result<Self, StoreError> {
        let bad = |e: String| StoreError::Config(format!("rediss: {e}"));
        crate::links::check_server_certificate(url, tls)
            .await
            .map_err(bad)?;
        let root_cert = tls.ca_pem().map_err(bad)?;
        let client_tls = tls
            .identity_pem()
            .map_err(bad)?
            .map(|(client_cert, client_key)| redis::ClientTlsConfig {
                client_cert,
                client_key,
            });
        let client = if root_cert.is_some() || client_tls.is_some() {
            redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls,
                    root_cert,
                },
            )
        } else {
            redis::Client::open(url)
        }
        .map_err(unavailable)?;
        // reconnecting after an outage: tries at most 1 s apart, so that every role is
        // back within a second of Redis (the active coordinator retakes its lease before a
        // standby may take it)
        let config = ConnectionManagerConfig::new().set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(unavailable)?;
        Ok(Self {
            conn,
            prefix: prefix.to_owned(),
        })
    }

    fn k(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    fn token(lease: &Lease) -> String {
        format!("{}|{}", lease.holder, lease.epoch)
    }

    /// Answers whether Redis answers (a readiness check).
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        redis::cmd("PING")
            .query_async::<()>(&mut conn)
            .await
            .map_err(unavailable)
    }

    /// Records a worker's heartbeat; answers the drain order left for it, if any.
    pub async fn heartbeat(&self, rec: &WorkerRecord) -> Result<Option<DrainOrder>, StoreError> {
        let mut conn = self.conn.clone();
        let key = self.k("workers");
        let json = serde_json::to_string(rec).map_err(|e| corrupt(&key, e))?;
        let (_, order): ((), Option<String>) = redis::pipe()
            .hset(&key, rec.id.to_string(), json)
            .hget(self.k("drains"), rec.id.to_string())
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        order
            .map(|o| serde_json::from_str(&o).map_err(|e| corrupt(&self.k("drains"), e)))
            .transpose()
    }

    /// Every registered worker with the drain order left for it, by id.
    pub async fn workers(&self) -> Result<Vec<(WorkerRecord, Option<DrainOrder>)>, StoreError> {
        let mut conn = self.conn.clone();
        let (workers, drains): (BTreeMap<String, String>, BTreeMap<String, String>) = redis::pipe()
            .hgetall(self.k("workers"))
            .hgetall(self.k("drains"))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        workers
            .into_iter()
            .map(|(id, json)| {
                let rec: WorkerRecord =
                    serde_json::from_str(&json).map_err(|e| corrupt(&self.k("workers"), e))?;
                let order = drains
                    .get(&id)
                    .map(|o| serde_json::from_str(o).map_err(|e| corrupt(&self.k("drains"), e)))
                    .transpose()?;
                Ok((rec, order))
            })
            .collect()
    }

    /// Leaves a drain order for a registered worker; `false` if no such worker.
    pub async fn request_drain(
        &self,
        id: &WorkerId,
        order: DrainOrder,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let known: bool = conn
            .hexists(self.k("workers"), id.to_string())
            .await
            .map_err(unavailable)?;
        if known {
            let json = serde_json::to_string(&order).map_err(|e| corrupt(&self.k("drains"), e))?;
            let _: () = conn
                .hset(self.k("drains"), id.to_string(), json)
                .await
                .map_err(unavailable)?;
        }
        Ok(known)
    }

    /// Withdraws a drain order; `false` if none was left.
    pub async fn undrain(&self, id: &WorkerId) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let n: i64 = conn
            .hdel(self.k("drains"), id.to_string())
            .await
            .map_err(unavailable)?;
        Ok(n > 0)
    }

    /// Removes a worker that exited (and any drain order left for it).
    pub async fn deregister(&self, id: &WorkerId) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: () = redis::pipe()
            .hdel(self.k("workers"), id.to_string())
            .hdel(self.k("drains"), id.to_string())
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Deletes every key under the prefix (for tests and teardown).
    pub async fn delete_all(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let pattern = format!("{}*", self.prefix);
        let keys: Vec<String> = {
            let mut it: redis::AsyncIter<String> =
                conn.scan_match(&pattern).await.map_err(unavailable)?;
            let mut keys = Vec::new();
            while let Some(k) = futures::StreamExt::next(&mut it).await {
                keys.push(k.map_err(unavailable)?);
            }
            keys
        };
        if !keys.is_empty() {
            let _: () = conn.del(keys).await.map_err(unavailable)?;
        }
        Ok(())
    }
}

#[async_trait]
impl LeaseStore for RedisStore {
    async fn acquire(
        &self,
        key: &str,
        holder: &WorkerId,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        let mut conn = self.conn.clone();
        let epoch: Option<u64> = Script::new(ACQUIRE)
            .key(self.k(&format!("lease:{key}")))
            .key(self.k(&format!("epoch:{key}")))
            .key(self.k("epoch-floor"))
            .arg(holder.to_string())
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(epoch.map(|e| Lease {
            key: key.to_owned(),
            holder: holder.clone(),
            epoch: Epoch(e),
        }))
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let ok: i64 = Script::new(RENEW)
            .key(self.k(&format!("lease:{}", lease.key)))
            .arg(Self::token(lease))
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(ok == 1)
    }

    async fn is_current(&self, lease: &Lease) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let v: Option<String> = conn
            .get(self.k(&format!("lease:{}", lease.key)))
            .await
            .map_err(unavailable)?;
        Ok(v.as_deref() == Some(Self::token(lease).as_str()))
    }

    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = Script::new(RELEASE)
            .key(self.k(&format!("lease:{}", lease.key)))
            .arg(Self::token(lease))
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn holder(&self, key: &str) -> Result<Option<WorkerId>, StoreError> {
        let mut conn = self.conn.clone();
        let v: Option<String> = conn
            .get(self.k(&format!("lease:{key}")))
            .await
            .map_err(unavailable)?;
        // `<holder>|<epoch>`; holder ids may contain `|`, the epoch never does
        Ok(v.and_then(|t| t.rsplit_once('|').map(|(h, _)| WorkerId(h.to_owned()))))
    }

    async fn evict(&self, key: &str, holder: &WorkerId) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let n: i64 = Script::new(EVICT)
            .key(self.k(&format!("lease:{key}")))
            .arg(holder.to_string())
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(n == 1)
    }
}

impl RedisStore {
    /// The job's record and state in one transaction; `forget_chunks` also drops the
    /// chunk states and dead letters an earlier plan left.
    async fn record_job(&self, job: &JobRecord, forget_chunks: bool) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let key = self.k(&format!("job:{}", job.id));
        let record = serde_json::to_string(job).map_err(|e| corrupt(&key, e))?;
        let state = serde_json::to_string(&job.state).map_err(|e| corrupt(&key, e))?;
        let mut pipe = redis::pipe();
        pipe.atomic()
            .set(&key, record)
            .ignore()
            .set(format!("{key}:state"), state)
            .ignore()
            // a job recorded (again) has not ended yet
            .del(format!("{key}:finished_at"))
            .ignore()
            .sadd(self.k("jobs"), job.id.to_string())
            .ignore();
        if forget_chunks {
            pipe.del(format!("{key}:chunks"))
                .ignore()
                .del(format!("{key}:dlq"))
                .ignore();
        }
        let _: () = pipe.query_async(&mut conn).await.map_err(unavailable)?;
        Ok(())
    }
}

#[async_trait]
impl JobStore for RedisStore {
    async fn put_job(&self, job: &JobRecord) -> Result<(), StoreError> {
        self.record_job(job, false).await
    }

    async fn replan_job(&self, job: &JobRecord) -> Result<(), StoreError> {
        self.record_job(job, true).await
    }

    async fn get_job(&self, id: &JobId) -> Result<Option<JobRecord>, StoreError> {
        let mut conn = self.conn.clone();
        let key = self.k(&format!("job:{id}"));
        let (record, state): (Option<String>, Option<String>) = redis::pipe()
            .get(&key)
            .get(format!("{key}:state"))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let Some(record) = record else {
            return Ok(None);
        };
        let mut job: JobRecord = serde_json::from_str(&record).map_err(|e| corrupt(&key, e))?;
        if let Some(s) = state {
            job.state = serde_json::from_str(&s).map_err(|e| corrupt(&key, e))?;
        }
        Ok(Some(job))
    }

    async fn job_state(&self, id: &JobId) -> Result<Option<JobState>, StoreError> {
        let mut conn = self.conn.clone();
        let key = self.k(&format!("job:{id}:state"));
        let state: Option<String> = conn.get(&key).await.map_err(unavailable)?;
        state
            .map(|s| serde_json::from_str(&s).map_err(|e| corrupt(&key, e)))
            .transpose()
    }

    async fn list_jobs(&self) -> Result<Vec<JobId>, StoreError> {
        let mut conn = self.conn.clone();
        let ids: Vec<String> = conn.smembers(self.k("jobs")).await.map_err(unavailable)?;
        let mut out: Vec<JobId> = ids
            .iter()
            .map(|i| JobId::parse(i).map_err(|e| corrupt(&self.k("jobs"), e)))
            .collect::<Result<_, _>>()?;
        out.sort();
        Ok(out)
    }

    async fn set_job_state(&self, id: &JobId, state: &JobState) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let key = self.k(&format!("job:{id}"));
        let exists: bool = conn.exists(&key).await.map_err(unavailable)?;
        if !exists {
            return Err(corrupt(&key, "no such job"));
        }
        let s = serde_json::to_string(state).map_err(|e| corrupt(&key, e))?;
        let mut pipe = redis::pipe();
        pipe.set(format!("{key}:state"), s).ignore();
        if state.is_terminal() {
            // the first end counts (a later terminal state, e.g. a cancel, keeps it)
            pipe.cmd("SET")
                .arg(format!("{key}:finished_at"))
                .arg(chrono::Utc::now().timestamp_millis())
                .arg("NX")
                .ignore();
        }
        let _: () = pipe.query_async(&mut conn).await.map_err(unavailable)?;
        Ok(())
    }

    async fn finished_at_ms(&self, id: &JobId) -> Result<Option<i64>, StoreError> {
        let mut conn = self.conn.clone();
        conn.get(self.k(&format!("job:{id}:finished_at")))
            .await
            .map_err(unavailable)
    }

    async fn set_chunk_state(
        &self,
        id: &JobId,
        chunk: ChunkId,
        state: &ChunkState,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let key = self.k(&format!("job:{id}:chunks"));
        let s = serde_json::to_string(state).map_err(|e| corrupt(&key, e))?;
        let _: i64 = Script::new(SET_CHUNK)
            .key(&key)
            .arg(chunk.0)
            .arg(s)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn chunk_states(&self, id: &JobId) -> Result<BTreeMap<ChunkId, ChunkState>, StoreError> {
        let mut conn = self.conn.clone();
        let key = self.k(&format!("job:{id}:chunks"));
        let all: Vec<(u32, String)> = conn.hgetall(&key).await.map_err(unavailable)?;
        all.into_iter()
            .map(|(c, s)| {
                serde_json::from_str(&s)
                    .map(|st| (ChunkId(c), st))
                    .map_err(|e| corrupt(&key, e))
            })
            .collect()
    }

    async fn add_dead_letter(&self, id: &JobId, dead: &DeadLetter) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let key = self.k(&format!("job:{id}:dlq"));
        let v = serde_json::to_string(dead).map_err(|e| corrupt(&key, e))?;
        let _: i64 = conn
            .hset(&key, dead.chunk.0, v)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn dead_letters(&self, id: &JobId) -> Result<Vec<DeadLetter>, StoreError> {
        let mut conn = self.conn.clone();
        let key = self.k(&format!("job:{id}:dlq"));
        let all: Vec<(u32, String)> = conn.hgetall(&key).await.map_err(unavailable)?;
        let mut out = all
            .into_iter()
            .map(|(_, s)| serde_json::from_str::<DeadLetter>(&s).map_err(|e| corrupt(&key, e)))
            .collect::<Result<Vec<_>, _>>()?;
        out.sort_by_key(|d| d.chunk);
        Ok(out)
    }

    async fn remove_dead_letters(&self, id: &JobId, chunks: &[ChunkId]) -> Result<(), StoreError> {
        if chunks.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let key = self.k(&format!("job:{id}:dlq"));
        let fields: Vec<u32> = chunks.iter().map(|c| c.0).collect();
        let _: i64 = conn.hdel(&key, fields).await.map_err(unavailable)?;
        Ok(())
    }
}
