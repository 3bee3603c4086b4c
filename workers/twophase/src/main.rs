//! `twophase`: one binary with a subcommand per worker and per ops task.

use std::process::ExitCode;

// Every message is a few dozen short-lived allocations (headers, JSON, spans); glibc's
// allocator spent a fifth of a worker's time on them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    twophase::cli::main().await
}
