//! `haul loader`: the Arrow Flight server that loads chunks into a target Postgres.

use haul::cli::LoaderArgs;
use haul_shared::load::{LoaderOptions, serve};
use haul_shared::pg::Database;

pub(super) async fn run(a: LoaderArgs) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", a.listen))?;
    let opts = LoaderOptions {
        target: Database::from_user(&a.target, a.target_password_file)
            .map_err(|e| anyhow::anyhow!("--target: {e}"))?,
        ledger_schema: a.ledger_schema,
        token: a.serve.token(),
        tls: a.serve.tls(),
        metrics_listen: a.metrics_listen,
    };
    // a chunk being loaded is rolled back; its worker retries it
    let shutdown = super::stop_on_signal("loader stopping")?;
    serve(listener, opts, shutdown).await?;
    Ok(())
}
