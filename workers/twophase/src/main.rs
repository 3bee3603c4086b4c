//! `twophase`: one binary with a subcommand per worker and per ops task.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    twophase::cli::main().await
}
