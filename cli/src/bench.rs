//! `cairn bench`: workloads that measure this machine's limits and the engine against them.

use std::process::ExitCode;

use anyhow::Result;

/// Arguments of `cairn bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs the selected benchmarks.
pub async fn run(_args: BenchArgs) -> Result<ExitCode> {
    anyhow::bail!("benchmarks are being written")
}
