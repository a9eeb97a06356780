//! Chunked (fused) vs naive distillation loss, forward + backward, on NdArray: time (criterion)
//! and peak heap memory (counting global allocator, printed once per path before timing).
//!
//! Default problem (issue 2): V = 151,936, H = 1,024, N·R = 2,048 (8 × 256), JSD(β = 0.5),
//! token reduction, chunks of 128 rows. Override with `OMNIOPSD_BENCH_V`, `OMNIOPSD_BENCH_H`,
//! `OMNIOPSD_BENCH_ROWS` (multiple of 256), `OMNIOPSD_BENCH_CHUNK`; set
//! `OMNIOPSD_BENCH_SKIP_NAIVE=1` to time only the chunked path (the naive one needs ~12.5 GiB
//! at full size), and `OMNIOPSD_BENCH_PEAK_ONLY=1` to stop after the single measured run of
//! each path (peak memory and one wall time), skipping the criterion samples.
//!
//! Run: `cargo bench -p omniopsd-benches -- --sample-size 10`

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use omniopsd_benches::{chunked, naive, CountingAllocator, Problem};
use omniopsd_core::divergence::LossConfig;

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator::new();

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Peak heap bytes above the bytes live before `f` runs, and its wall time.
fn peak_bytes<T>(f: impl FnOnce() -> T) -> (T, usize, Duration) {
    let base = ALLOC.live();
    ALLOC.reset_peak();
    let started = Instant::now();
    let out = f();
    let elapsed = started.elapsed();
    (out, ALLOC.peak().saturating_sub(base), elapsed)
}

fn gib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

fn distill_loss(c: &mut Criterion) {
    let v = env_usize("OMNIOPSD_BENCH_V", 151_936);
    let h = env_usize("OMNIOPSD_BENCH_H", 1_024);
    let rows = env_usize("OMNIOPSD_BENCH_ROWS", 2_048);
    let chunk = env_usize("OMNIOPSD_BENCH_CHUNK", 128);
    let skip_naive = std::env::var("OMNIOPSD_BENCH_SKIP_NAIVE").is_ok_and(|s| s == "1");
    let r = 256.min(rows);
    let n = rows / r;
    let problem = Problem::<omniopsd_benches::Cpu>::random(n, r, h, v);
    let cfg = LossConfig::default();
    println!(
        "distill_loss: V={v} H={h} N*R={} ({n}x{r}) chunk_rows={chunk} {cfg:?}",
        n * r
    );

    let ((loss_c, gh_c, gw_c), peak_c, time_c) = peak_bytes(|| chunked(&problem, &cfg, chunk));
    println!(
        "peak heap above inputs: chunked {} bytes ({:.3} GiB), loss {loss_c}, single run {:.2} s",
        peak_c,
        gib(peak_c),
        time_c.as_secs_f64()
    );
    if !skip_naive {
        let ((loss_n, gh_n, gw_n), peak_n, time_n) = peak_bytes(|| naive(&problem, &cfg));
        let diff_h = (gh_n - gh_c.clone()).abs().max().into_scalar();
        let diff_w = (gw_n - gw_c.clone()).abs().max().into_scalar();
        println!(
            "peak heap above inputs: naive {} bytes ({:.3} GiB), loss {loss_n}, single run {:.2} s; chunked/naive = {:.1}%",
            peak_n,
            gib(peak_n),
            time_n.as_secs_f64(),
            100.0 * peak_c as f64 / peak_n as f64
        );
        println!(
            "chunked vs naive: |dloss| {:.2e}, max|dgrad_hidden| {diff_h:.2e}, max|dgrad_weight| {diff_w:.2e}",
            (loss_c - loss_n).abs()
        );
    }
    drop((gh_c, gw_c));
    if std::env::var("OMNIOPSD_BENCH_PEAK_ONLY").is_ok_and(|s| s == "1") {
        return;
    }

    let mut group = c.benchmark_group("distill_loss_fwd_bwd");
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(1));
    group.measurement_time(Duration::from_secs(5));
    group.bench_function(format!("chunked_{chunk}"), |b| {
        b.iter(|| chunked(&problem, &cfg, chunk))
    });
    if !skip_naive {
        group.bench_function("naive", |b| b.iter(|| naive(&problem, &cfg)));
    }
    group.finish();
}

criterion_group!(benches, distill_loss);
criterion_main!(benches);
