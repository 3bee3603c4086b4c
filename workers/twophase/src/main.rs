//! `twophase`: one binary with a subcommand per worker and per ops task.

// Every message is a few dozen short-lived allocations (headers, JSON, spans); glibc's
// allocator spent a fifth of a worker's time on them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let code = twophase::cli::main().await;
    // Exits here rather than when the runtime is dropped, which waits for every blocking task:
    // a Kafka client still trying a broker out of reach would hold a finished command for the
    // rest of its own deadline.
    std::process::exit(i32::from(code));
}
