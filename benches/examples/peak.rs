//! The matrix-product rate the benchmark backend reaches: `n × n × n` products of random
//! matrices in its float type (bf16 on CUDA, f32 on the CPU). `compare.py` takes the
//! faster of this and PyTorch's as the CPU's peak for MFU; `benches/gpu/gpu.py` reports it
//! beside PyTorch's (the MFU denominator there) and falls back to it.
//!
//! For each size: untimed products for at least a second (and at least 3), so a GPU's clocks
//! have ramped up, then `--repeats` products timed together up to a device sync (their
//! outputs kept alive until then, so none is skipped). Prints one JSON line per size: seconds
//! per product and TFLOP/s at `2n³` FLOPs each.
//!
//! `cargo run --release -p omniopsd-benches --features cuda --example peak -- [--sizes
//! 4096,8192] [--repeats 10]`

use std::time::Instant;

use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use omniopsd_benches::{count, flag_values, Bench as B};
use serde_json::json;

fn main() -> Result<(), String> {
    let mut sizes = vec![1024, 2048];
    let mut repeats = 5;
    for (flag, value) in flag_values()? {
        match flag.as_str() {
            "--sizes" => {
                sizes = value
                    .split(',')
                    .map(|n| count(&flag, n, 1))
                    .collect::<Result<_, _>>()?
            }
            "--repeats" => repeats = count(&flag, &value, 1)?,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    let device = Default::default();
    let sync = || B::sync(&device).map_err(|e| format!("device sync: {e:?}"));
    for n in sizes {
        let a = Tensor::<B, 2>::random([n, n], Distribution::Normal(0.0, 1.0), &device);
        let b = Tensor::<B, 2>::random([n, n], Distribution::Normal(0.0, 1.0), &device);
        let warm = Instant::now();
        let mut products = 0;
        while products < 3 || warm.elapsed().as_secs_f64() < 1.0 {
            let batch: Vec<_> = (0..3).map(|_| a.clone().matmul(b.clone())).collect();
            sync()?;
            drop(batch);
            products += 3;
        }
        let start = Instant::now();
        let outs: Vec<_> = (0..repeats).map(|_| a.clone().matmul(b.clone())).collect();
        sync()?;
        let seconds = start.elapsed().as_secs_f64() / repeats as f64;
        drop(outs);
        let flops = 2.0 * (n as f64).powi(3);
        println!(
            "{}",
            json!({
                "backend": B::name(&device),
                "n": n,
                "seconds_per_product": seconds,
                "tflops": flops / seconds / 1e12,
            })
        );
    }
    Ok(())
}
