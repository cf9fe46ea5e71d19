//! KEDA, played by the test: it reads the chunk queue's depth from RabbitMQ's HTTP
//! management API the way KEDA's rabbitmq scaler does with `protocol: http` and
//! `mode: QueueLength` (`messages`: ready plus delivered-but-unacknowledged), asks for
//! `ceil(depth / value)` workers clamped to `[min, max]`, scales up at once and down only
//! after the lower count held for a cooldown (the HPA's stabilization window; to zero,
//! KEDA's `cooldownPeriod`), and starts worker processes or sends them SIGTERM, as the
//! Deployment's ReplicaSet would. Each terminated worker must exit 0 within its grace
//! period (Kubernetes' `terminationGracePeriodSeconds`, after which it would be killed).

use std::process::Command;
use std::time::{Duration, Instant};

use super::cluster::Cluster;

/// The ScaledObject's numbers.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ScaledObject {
    pub(crate) min: usize,
    pub(crate) max: usize,
    /// Chunks per worker (the trigger's `value`).
    pub(crate) value: f64,
    pub(crate) polling: Duration,
    pub(crate) cooldown: Duration,
    /// The pod's `terminationGracePeriodSeconds`.
    pub(crate) grace: Duration,
}

impl ScaledObject {
    /// The replica count KEDA asks for at this depth.
    pub(crate) fn desired(&self, depth: u64) -> usize {
        let want = (depth as f64 / self.value).ceil() as usize;
        want.clamp(self.min, self.max)
    }
}

/// One look: seconds since the start, the queue's depth, the replicas asked for, the
/// worker processes alive (terminating ones included).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sample {
    pub(crate) t: f64,
    pub(crate) depth: u64,
    pub(crate) desired: usize,
    pub(crate) alive: usize,
}

/// A worker the scaler terminated: when, how long it took to exit, and how.
#[derive(Debug)]
pub(crate) struct Terminated {
    pub(crate) id: String,
    pub(crate) signalled: chrono::DateTime<chrono::Utc>,
    pub(crate) took: Duration,
    pub(crate) status: std::process::ExitStatus,
}

/// `messages` of a queue in RabbitMQ's management API (vhost `/`), as KEDA reads it.
pub(crate) fn queue_messages(queue: &str) -> u64 {
    let url = format!("http://127.0.0.1:15672/api/queues/%2F/{queue}");
    let out = Command::new("curl")
        .args(["-fsS", "-u", "guest:guest", &url])
        .output()
        .expect("curl runs");
    assert!(
        out.status.success(),
        "the management API did not answer for {queue}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // a new queue has no statistics until the first collection
    v["messages"].as_u64().unwrap_or(0)
}

/// Scales the cluster's workers on its chunk queue until `job` has ended and every worker
/// has gone (scaled to zero); returns the timeline and the terminations.
pub(crate) fn autoscale(
    cl: &mut Cluster,
    so: ScaledObject,
    worker_args: &[&str],
    job: &str,
    deadline: Duration,
) -> (Vec<Sample>, Vec<Terminated>) {
    let t0 = Instant::now();
    // worker processes are the cluster's (it kills what is left if the test fails)
    let mut live: Vec<String> = Vec::new();
    let mut terminating: Vec<(String, Instant, chrono::DateTime<chrono::Utc>)> = Vec::new();
    let mut ended = Vec::new();
    let mut timeline = Vec::new();
    let mut started = 0;
    // since when the desired count has been below the live count
    let mut lower_since: Option<Instant> = None;
    loop {
        assert!(
            t0.elapsed() < deadline,
            "autoscaled job did not end in {deadline:?}: {timeline:?}\n{}",
            cl.logs()
        );
        // exits of terminating workers, each within its grace period
        let mut still = Vec::new();
        for (id, since, signalled) in terminating.drain(..) {
            match cl.worker(&id).try_wait().unwrap() {
                Some(status) => ended.push(Terminated {
                    id,
                    signalled,
                    took: since.elapsed(),
                    status,
                }),
                None => {
                    assert!(
                        since.elapsed() < so.grace,
                        "worker {id} did not exit within its grace period of {:?}:\n{}",
                        so.grace,
                        cl.logs()
                    );
                    still.push((id, since, signalled));
                }
            }
        }
        terminating = still;
        for id in &live {
            assert!(
                cl.worker(id).try_wait().unwrap().is_none(),
                "worker {id} died unasked:\n{}",
                cl.logs()
            );
        }
        let depth = queue_messages(&cl.queue);
        let desired = so.desired(depth);
        timeline.push(Sample {
            t: t0.elapsed().as_secs_f64(),
            depth,
            desired,
            alive: live.len() + terminating.len(),
        });
        if desired > live.len() {
            lower_since = None;
            while live.len() < desired {
                started += 1;
                let id = format!("as{started}");
                cl.start_worker(&id, worker_args);
                live.push(id);
            }
        } else if desired < live.len() {
            let since = *lower_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= so.cooldown {
                // the ReplicaSet removes the newest pods first
                while live.len() > desired {
                    let id = live.pop().unwrap();
                    cl.signal(&id, "TERM");
                    terminating.push((id, Instant::now(), chrono::Utc::now()));
                }
                lower_since = None;
            }
        } else {
            lower_since = None;
        }
        if live.is_empty() && terminating.is_empty() && started > 0 && job_ended(cl, job) {
            return (timeline, ended);
        }
        std::thread::sleep(so.polling);
    }
}

fn job_ended(cl: &Cluster, job: &str) -> bool {
    let status: serde_json::Value =
        serde_json::from_str(&cl.haul_ok(&["status", job, "--json"])).unwrap();
    matches!(
        status["state"].as_str(),
        Some("succeeded" | "failed" | "cancelled")
    )
}

/// The timeline as CSV (`t,depth,desired,alive`), for the picture in BENCHMARKS.md.
pub(crate) fn timeline_csv(timeline: &[Sample]) -> String {
    let mut out = String::from("t,depth,desired,alive\n");
    for s in timeline {
        out.push_str(&format!(
            "{:.1},{},{},{}\n",
            s.t, s.depth, s.desired, s.alive
        ));
    }
    out
}
