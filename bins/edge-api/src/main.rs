//! edge-api: Fleet's REST front door (the routes live in the library).

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cfg = edge_api::Config::parse();
    let telemetry = fleet::telemetry::init("edge-api", cfg.common.log_format)?;
    fleet::memory::purge_when_idle();
    let shutdown = fleet::shutdown::on_signal();
    let result = match edge_api::App::build(cfg).await {
        Ok(app) => app.run(shutdown).await,
        Err(e) => Err(e),
    };
    if let Err(e) = &result {
        tracing::error!(error = %format!("{e:#}"), "edge-api failed");
    }
    telemetry.shutdown();
    result
}
