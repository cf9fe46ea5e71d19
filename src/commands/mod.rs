//! One module per subcommand; [`dispatch`] runs the one the user chose.

mod admin;
mod coordinator;
mod lake;
mod loader;
mod run;
mod submit;
mod worker;

use haul::cli::Cmd;
use tokio_util::sync::CancellationToken;

/// A failure whose report the command printed already (`verify --json` prints its
/// findings, then fails): `main` gives it the exit code and its line, and no second JSON
/// object.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Reported(pub(crate) String);

pub(crate) async fn dispatch(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Run(a) => run::run(a).await,
        Cmd::Plan(a) => run::plan(a).await,
        Cmd::Coordinator(a) => coordinator::run(a).await,
        Cmd::Worker(a) => worker::run(a).await,
        Cmd::Loader(a) => loader::run(a).await,
        Cmd::Submit(a) => submit::run(a).await,
        Cmd::Jobs(c) => admin::jobs(c).await,
        Cmd::Status(a) => admin::status(a).await,
        Cmd::Watch(a) => admin::watch(a).await,
        Cmd::Cancel(a) => admin::control(a, "cancel").await,
        Cmd::Pause(a) => admin::control(a, "pause").await,
        Cmd::Resume(a) => admin::control(a, "resume").await,
        Cmd::Workers(c) => admin::workers(c).await,
        Cmd::Drain(a) => admin::drain(a).await,
        Cmd::Undrain(a) => admin::undrain(a).await,
        Cmd::Dlq(a) => admin::dlq(a).await,
        Cmd::Ls(a) => lake::ls(a).await,
        Cmd::Show(a) => lake::show(a).await,
        Cmd::Verify(a) => lake::verify(a).await,
        Cmd::Gc(a) => lake::gc(a).await,
        Cmd::Completions(a) => {
            use clap::CommandFactory;
            let mut cli = haul::cli::Cli::command();
            clap_complete::generate(a.shell, &mut cli, "haul", &mut std::io::stdout());
            Ok(())
        }
    }
}

/// A token that fires at SIGTERM or Ctrl-C, logging `msg`: how a server role
/// (coordinator, loader) and `haul run` learn to stop. (`haul worker` takes its signals
/// itself: a first one drains, a second aborts.)
fn stop_on_signal(msg: &'static str) -> anyhow::Result<CancellationToken> {
    haul_shared::shutdown::on_stop_signal(msg)
        .map_err(|e| anyhow::anyhow!("cannot install the signal handlers: {e}"))
}
