//! Opens a data directory and prints what recovery found and how long it took: a
//! tool for profiling start-up (`perf record ./target/release/examples/open_log DIR`).
//!
//! ```text
//! cargo run --release -p agentbus-file --example open_log -- DIR
//! ```

use agentbus::Transport;
use agentbus_file::{FileEngine, FileOptions};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let Some(dir) = std::env::args().nth(1) else {
        eprintln!("usage: open_log DIR");
        std::process::exit(2);
    };
    let started = std::time::Instant::now();
    let engine = match FileEngine::open(&dir, FileOptions::default()) {
        Ok(engine) => engine,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    let recovery = engine.recovery().clone();
    println!(
        "opened {dir} in {:.3} s: checkpoint {}, then {} records in {} segments",
        started.elapsed().as_secs_f64(),
        recovery.checkpoint.as_deref().unwrap_or("none"),
        recovery.records,
        recovery.segments
    );
    engine.close().await.expect("close");
}
