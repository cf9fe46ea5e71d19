//! The `haul` binary: the user's entry point to every role.

use std::process::ExitCode;

use clap::Parser;
use std::time::Duration;

use haul_coordinator::cli::{Cli, Cmd, JobCmdArgs, JobRequest};
use haul_coordinator::client;
use haul_coordinator::cluster::{self, CoordinatorOptions};
use haul_coordinator::progress::ProgressMode;
use haul_coordinator::run::{RunOptions, run};
use haul_shared::pg::Secret;
use haul_worker::loader::{LoaderOptions, serve as serve_loader};
use haul_worker::node::{NodeOptions, run_node};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    bound_malloc_arenas();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("haul: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(dispatch(cli.cmd)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("haul: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Run(args) => {
            let opts = RunOptions::try_from(args).map_err(anyhow::Error::msg)?;
            let interrupt = CancellationToken::new();
            let on_signal = interrupt.clone();
            tokio::spawn(async move {
                if tokio::signal::ctrl_c().await.is_ok() {
                    on_signal.cancel();
                }
            });
            let summary = run(opts, interrupt).await?;
            println!("{summary}");
        }
        Cmd::Coordinator(a) => {
            let opts = CoordinatorOptions {
                listen: a.listen,
                amqp: Secret::new(a.cluster.amqp),
                redis: Secret::new(a.cluster.redis),
                queue: a.cluster.queue,
                redis_prefix: a.cluster.redis_prefix,
                max_attempts: a.cluster.max_attempts.max(1),
                token: a.serve.token(),
                tls: a.serve.tls(),
                parallelism: a.parallelism.max(1),
                loader_tls_ca: a.loader_tls_ca,
                metrics_listen: a.metrics_listen,
            };
            let shutdown =
                stop_on_signal("stopping; unfinished jobs stay recorded for the next coordinator");
            cluster::serve(opts, shutdown).await?;
        }
        Cmd::Worker(a) => {
            let opts = NodeOptions {
                id: a.id,
                coordinator: a.client.options(),
                amqp: Secret::new(a.cluster.amqp),
                redis: Secret::new(a.cluster.redis),
                queue: a.cluster.queue,
                redis_prefix: a.cluster.redis_prefix,
                slots: a.slots.max(1),
                lease_ttl: Duration::from_secs(a.lease_ttl_secs.max(1)),
                max_attempts: a.cluster.max_attempts.max(1),
                drain_grace: a.drain_grace_secs.map(Duration::from_secs),
                metrics_listen: a.metrics_listen,
            };
            run_node(opts).await?;
        }
        Cmd::Loader(a) => {
            let listener = tokio::net::TcpListener::bind(a.listen)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", a.listen))?;
            let opts = LoaderOptions {
                target: Secret::new(a.target),
                ledger_schema: a.ledger_schema,
                token: a.serve.token(),
                tls: a.serve.tls(),
                metrics_listen: a.metrics_listen,
            };
            // a chunk being loaded is rolled back; its worker retries it
            let shutdown = stop_on_signal("loader stopping");
            serve_loader(listener, opts, shutdown).await?;
        }
        Cmd::Submit(a) => {
            let j = JobRequest::try_from(a.job).map_err(anyhow::Error::msg)?;
            let s = client::submit(&a.client.options(), j, a.wait, a.progress).await?;
            if a.wait {
                print!("{}", client::status_text(&s));
            } else {
                println!("{}", s.job_id);
            }
        }
        Cmd::Jobs(c) => print!("{}", client::jobs_table(&client::jobs(&c.options()).await?)),
        Cmd::Status(a) => print!(
            "{}",
            client::status_text(&client::status(&a.client.options(), &a.job).await?)
        ),
        Cmd::Watch(a) => {
            let s = client::watch(&a.client.options(), &a.job, ProgressMode::Auto).await?;
            print!("{}", client::status_text(&s));
        }
        Cmd::Cancel(a) => control(&a, "cancel").await?,
        Cmd::Pause(a) => control(&a, "pause").await?,
        Cmd::Resume(a) => control(&a, "resume").await?,
        Cmd::Workers(c) => print!(
            "{}",
            client::workers_table(&client::workers(&c.options()).await?)
        ),
        Cmd::Drain(a) => {
            let w =
                client::drain(&a.client.options(), &a.worker, a.requeue_in_flight, a.wait).await?;
            if a.wait {
                println!("worker {} drained and left", a.worker);
            } else {
                print!("{}", client::workers_table(&[w]));
            }
        }
        Cmd::Undrain(a) => print!(
            "{}",
            client::workers_table(&[client::undrain(&a.client.options(), &a.worker).await?])
        ),
    }
    Ok(())
}

/// A token that fires on SIGTERM or Ctrl-C, logging `msg`.
fn stop_on_signal(msg: &'static str) -> CancellationToken {
    let stop = CancellationToken::new();
    let on_signal = stop.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("{msg}");
        on_signal.cancel();
    });
    stop
}

async fn control(a: &JobCmdArgs, what: &str) -> anyhow::Result<()> {
    let s = client::control(&a.client.options(), &a.job, what).await?;
    print!("{}", client::status_text(&s));
    Ok(())
}

/// glibc's allocator, tuned for haul's pattern (a few threads allocating and freeing
/// batch-sized buffers, megabytes each, all job long):
/// - each thread that allocates concurrently gets its own arena, up to 8 per core, which
///   keeps what it grew: over a long job the runtime's and blocking pool's threads doubled
///   peak RSS (198 MiB at 10M rows against 110 MiB with two arenas, at the same speed);
/// - buffers above the mmap threshold are mapped and unmapped per batch, and arena tops
///   above the trim threshold are handed back: either way the next batch faults its pages
///   in and the kernel zeroes them again (a fixed 32 MiB threshold and a 256 MiB trim
///   threshold took haul's CPU on 10M rows from 5.2-5.6 to 5.0-5.3 core-s, peak RSS alike).
///
/// glibc reads these only at start-up, so unless the user set `MALLOC_ARENA_MAX`, haul
/// re-executes itself once with them set (a setting the user gave is kept). The process
/// id stays the same.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn bound_malloc_arenas() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut cmd = std::process::Command::new(exe);
    cmd.args(std::env::args_os().skip(1))
        .env("MALLOC_ARENA_MAX", "2");
    for (var, value) in [
        ("MALLOC_MMAP_THRESHOLD_", "33554432"),
        ("MALLOC_TRIM_THRESHOLD_", "268435456"),
    ] {
        if std::env::var_os(var).is_none() {
            cmd.env(var, value);
        }
    }
    // `exec` returns only if it failed; then carry on with glibc's defaults
    let _ = cmd.exec();
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn bound_malloc_arenas() {}
