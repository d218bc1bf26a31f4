use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    fleet_bench::run(fleet_bench::Cli::parse()).await
}
