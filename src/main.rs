//! The `haul` binary: the user's entry point to every role. `main` sets up logging and
//! the runtime; each subcommand is a module of [`commands`].

mod commands;

use std::process::ExitCode;

use clap::Parser;
use haul::cli::Cli;

fn main() -> ExitCode {
    bound_malloc_arenas();
    let cli = Cli::parse();
    quiet_on_a_closed_pipe(&cli.cmd);
    // (clap has parsed the arguments: a `--json` among them is the flag)
    let json = std::env::args_os().any(|a| a == "--json")
        || std::env::var("HAUL_JSON").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        // log lines go above a progress bar, not through it
        .with_writer(haul::progress::LogWriter)
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
    match rt.block_on(commands::dispatch(cli.cmd)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // the chain of causes, each once: an error that shows its source in its own
            // message is not followed by that source again
            let mut line = e.to_string();
            for cause in e.chain().skip(1) {
                let cause = cause.to_string();
                if !line.contains(&cause) {
                    line = format!("{line}: {cause}");
                }
            }
            eprintln!("haul: error: {line}");
            if json && e.downcast_ref::<commands::Reported>().is_none() {
                // a script reading stdout gets an object on failure too
                println!("{}", serde_json::json!({ "error": line }));
            }
            ExitCode::FAILURE
        }
    }
}

/// A command whose output is piped into `head` ends quietly when `head` has read enough,
/// as Unix tools do (Rust ignores SIGPIPE, so each print would panic instead). The
/// services keep ignoring it: a peer that hangs up is an error they handle.
#[allow(unsafe_code)]
fn quiet_on_a_closed_pipe(cmd: &haul::cli::Cmd) {
    use haul::cli::Cmd;
    if matches!(cmd, Cmd::Coordinator(_) | Cmd::Worker(_) | Cmd::Loader(_)) {
        return;
    }
    // SAFETY: called before any thread starts; SIG_DFL is a valid disposition
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
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
