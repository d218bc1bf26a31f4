use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cfg = ws_gateway::Config::parse();
    let telemetry = fleet::telemetry::init("ws-gateway", cfg.common.log_format)?;
    fleet::memory::purge_when_idle();
    let shutdown = fleet::shutdown::on_signal();
    let result = match ws_gateway::App::build(cfg).await {
        Ok(app) => app.run(shutdown).await,
        Err(e) => Err(e),
    };
    telemetry.shutdown();
    result
}
