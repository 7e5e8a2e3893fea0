//! Criterion benches of the memory engine: publish → deliver → ack at 1:1 and 4:4, and
//! the request/reply round trip. `agentbus bench` prints the same workloads with
//! percentiles.

use std::sync::Arc;
use std::time::Duration;

use agentbus::{MemoryEngine, Transport};
use agentbus_bench::{pipeline, request_reply, PipelineSpec};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn engine() -> Arc<dyn Transport> {
    Arc::new(MemoryEngine::new())
}

fn benches(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let messages = 100_000;
    let mut group = c.benchmark_group("memory");
    group.throughput(Throughput::Elements(messages));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    for (producers, consumers) in [(1, 1), (4, 4)] {
        group.bench_function(format!("pipeline_{producers}to{consumers}_256B"), |b| {
            b.to_async(&runtime).iter_custom(|iterations| async move {
                let mut total = Duration::ZERO;
                for _ in 0..iterations {
                    let spec = PipelineSpec {
                        producers,
                        consumers,
                        messages,
                        ..PipelineSpec::default()
                    };
                    total += pipeline(engine(), spec)
                        .await
                        .expect("pipeline runs")
                        .elapsed;
                }
                total
            })
        });
    }
    group.throughput(Throughput::Elements(1_000));
    group.bench_function("request_reply_1000", |b| {
        b.to_async(&runtime).iter_custom(|iterations| async move {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                total += request_reply(engine(), 1_000, 64)
                    .await
                    .expect("round trips")
                    .elapsed;
            }
            total
        })
    });
    group.finish();
}

criterion_group!(memory, benches);
criterion_main!(memory);
