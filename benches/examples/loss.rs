//! The chunked distillation loss, forward + backward, timed and its peak memory measured: the
//! Rust half of workload 3 of `benches/compare/compare.py` (`loss.py` runs PyTorch's naive
//! full-logits loss on the same inputs).
//!
//! Inputs are [`Problem::deterministic`] (`N·R` rows of hidden size `H`, vocabulary `V`, the
//! last quarter of each 256-row sequence padding), the loss generalized JSD β = 0.5 with token
//! reduction, the teacher given as hidden states + the shared head, gradients w.r.t. the
//! student hidden states and the head. Peak memory is measured two ways: resident set
//! (`VmHWM` after resetting it through `/proc/self/clear_refs`, minus `VmRSS` before: the
//! same measure `loss.py` takes of PyTorch) and heap bytes (a counting allocator). Prints one
//! JSON line. With `--grads-out DIR`, the two gradients are written there as raw little-endian
//! f32 (`grad_hidden.f32`, `grad_weight.f32`, row-major), for `loss.py` to compare element by
//! element with PyTorch's.
//!
//! `cargo run --release -p omniopsd-benches --example loss -- [--rows 2048] [--hidden 1024]
//! [--vocab 151936] [--chunk 128] [--repeats 3] [--grads-out DIR]`

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::Tensor;
use omniopsd_benches::{chunked, count, flag_values, CountingAllocator, Problem};
use omniopsd_core::divergence::{Divergence, LossConfig};
use serde_json::json;

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator::new();

#[cfg(not(feature = "flex"))]
type B = burn::backend::NdArray<f32>;
/// `--features flex`: Burn's Flex CPU backend.
#[cfg(feature = "flex")]
type B = burn::backend::Flex<f32>;

/// A `kB` field of `/proc/self/status`, in bytes.
fn status_bytes(field: &str) -> Result<usize, String> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("/proc/self/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<usize>()
                .ok()
        })
        .map(|kb| kb * 1024)
        .ok_or_else(|| format!("/proc/self/status has no {field} line"))
}

/// Restarts the resident high-water mark at the current resident size (Linux ≥ 4.0).
fn reset_peak_rss() -> Result<(), String> {
    std::fs::write("/proc/self/clear_refs", "5").map_err(|e| format!("/proc/self/clear_refs: {e}"))
}

/// Writes a gradient as raw little-endian f32 to `dir/name`.
fn write_raw<const D: usize>(t: Tensor<B, D>, dir: &Path, name: &str) -> Result<(), String> {
    let v = t
        .into_data()
        .into_vec::<f32>()
        .map_err(|e| format!("reading a gradient: {e:?}"))?;
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    let path = dir.join(name);
    std::fs::write(&path, bytes).map_err(|e| format!("{}: {e}", path.display()))
}

fn main() -> Result<(), String> {
    omniopsd_backends::keep_freed_memory();
    let (mut rows, mut hidden, mut vocab, mut chunk, mut repeats) = (2048, 1024, 151_936, 128, 3);
    let mut grads_out: Option<PathBuf> = None;
    for (flag, value) in flag_values()? {
        if flag == "--grads-out" {
            grads_out = Some(PathBuf::from(value));
            continue;
        }
        let number = count(&flag, &value, 1)?;
        match flag.as_str() {
            "--rows" => rows = number,
            "--hidden" => hidden = number,
            "--vocab" => vocab = number,
            "--chunk" => chunk = number,
            "--repeats" => repeats = number,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    let r = 256.min(rows);
    let n = rows.div_ceil(r);
    let problem = Problem::<B>::deterministic(n, r, hidden, vocab);
    let cfg = LossConfig {
        divergence: Divergence::Jsd { beta: 0.5 },
        ..LossConfig::default()
    };

    let rss_before = status_bytes("VmRSS:")?;
    reset_peak_rss()?;
    let heap_before = ALLOC.live();
    ALLOC.reset_peak();
    let start = Instant::now();
    let (loss, grad_hidden, grad_weight) = chunked(&problem, &cfg, chunk);
    let first = start.elapsed().as_secs_f64();
    let peak_rss = status_bytes("VmHWM:")?.saturating_sub(rss_before);
    let peak_heap = ALLOC.peak().saturating_sub(heap_before);
    if let Some(dir) = &grads_out {
        write_raw(grad_hidden, dir, "grad_hidden.f32")?;
        write_raw(grad_weight, dir, "grad_weight.f32")?;
    } else {
        drop((grad_hidden, grad_weight));
    }

    let mut seconds = vec![first];
    for _ in 1..repeats {
        let start = Instant::now();
        let out = chunked(&problem, &cfg, chunk);
        seconds.push(start.elapsed().as_secs_f64());
        drop(out);
    }
    println!(
        "{}",
        json!({
            "rows": n * r, "hidden": hidden, "vocab": vocab, "chunk_rows": chunk,
            "loss": loss,
            "peak_rss_bytes": peak_rss, "peak_heap_bytes": peak_heap,
            "seconds": seconds,
        })
    );
    Ok(())
}
