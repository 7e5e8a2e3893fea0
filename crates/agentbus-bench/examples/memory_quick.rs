//! A quick look at the memory engine's figures:
//! `cargo run --release -p agentbus-bench --example memory_quick`.

use std::sync::Arc;

use agentbus::MemoryEngine;
use agentbus_bench::{pipeline, request_reply, PipelineSpec};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> agentbus::Result<()> {
    for (producers, consumers) in [(1, 1), (4, 4)] {
        let spec = PipelineSpec {
            producers,
            consumers,
            ..PipelineSpec::default()
        };
        let report = pipeline(Arc::new(MemoryEngine::new()), spec).await?;
        println!("{}", report.line());
    }
    let report = request_reply(Arc::new(MemoryEngine::new()), 20_000, 64).await?;
    println!("{}", report.line());
    Ok(())
}
