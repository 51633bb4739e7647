//! `graftd`: config -> start -> serve -> drain on SIGTERM/SIGINT -> exit 0.

use clap::Parser;
use graft_server::{config::Settings, server};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    graft_server::process::run_main(run())?
}

async fn run() -> anyhow::Result<()> {
    let cfg = Settings::parse().resolve()?;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if cfg.log_json {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .json()
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    if !cfg.model.exists() {
        anyhow::bail!(
            "model {} not found (run `make model`, or pass --model PATH)",
            cfg.model.display()
        );
    }
    let srv = server::start(cfg).await?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = srv.ready() => r?,
        _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT during start-up"); return srv.drain().await }
        _ = sigterm.recv() => { tracing::info!("SIGTERM during start-up"); return srv.drain().await }
    }
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining"),
        _ = sigterm.recv() => tracing::info!("SIGTERM: draining"),
    }
    srv.drain().await
}
