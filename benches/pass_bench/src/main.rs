//! Speed of the native quantizer (`rust/quant.rs`, compiled as it is) on Llama-3.2-1B
//! weight shapes in BF16: NF4 and FP4 (blocksize 64) and int8 row-wise, 1 and 2 threads.
//!
//! Prints one tab-separated line per case: `mode shape threads best_GB/s median_GB/s`,
//! GB/s being bytes of BF16 input per second. See README.md for the ON/OFF comparison.

#[allow(dead_code)]
#[path = "../../../rust/quant.rs"]
mod quant;

/// The part of `rust/header.rs` that `quant.rs` uses.
#[allow(dead_code)]
mod header {
    use std::fmt;

    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum Dtype {
        F16,
        BF16,
        F32,
        F64,
    }

    impl Dtype {
        pub fn as_str(self) -> &'static str {
            match self {
                Dtype::F16 => "F16",
                Dtype::BF16 => "BF16",
                Dtype::F32 => "F32",
                Dtype::F64 => "F64",
            }
        }

        pub fn bits(self) -> u64 {
            match self {
                Dtype::F16 | Dtype::BF16 => 16,
                Dtype::F32 => 32,
                Dtype::F64 => 64,
            }
        }
    }

    impl fmt::Display for Dtype {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.as_str())
        }
    }
}

use header::Dtype;
use quant::QuantType;
use std::hint::black_box;
use std::time::Instant;

/// Llama-3.2-1B linear weights, `(out_features, in_features)`.
const SHAPES: [(usize, usize); 4] = [(2048, 2048), (512, 2048), (8192, 2048), (2048, 8192)];

/// `n` values `N(0, 0.02)` as little-endian BF16 bytes (xorshift64* + Box-Muller,
/// rounded to nearest even), the same for every run.
fn bf16_normal(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut uniform = move || {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        ((s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let mut out = Vec::with_capacity(n * 2);
    while out.len() < n * 2 {
        let (u, v) = (uniform(), uniform());
        let r = (-2.0 * u.ln()).sqrt() * 0.02;
        for x in [
            r * (std::f64::consts::TAU * v).cos(),
            r * (std::f64::consts::TAU * v).sin(),
        ] {
            let bits = (x as f32).to_bits();
            let rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16;
            out.extend_from_slice(&(rounded as u16).to_le_bytes());
        }
    }
    out.truncate(n * 2);
    out
}

/// Best and median of `reps` timed calls (after one untimed call), in seconds.
fn time(reps: usize, mut f: impl FnMut()) -> (f64, f64) {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    (t[0], t[reps / 2])
}

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .map_or(15, |a| a.parse().expect("usage: pass_bench [REPS]"));
    for (i, &(rows, cols)) in SHAPES.iter().enumerate() {
        let n = rows * cols;
        let input = bf16_normal(n, i as u64 + 1);
        let gb = input.len() as f64 / 1e9;
        let mut packed = vec![0u8; quant::packed_len(n)];
        let mut absmax = vec![0f32; quant::blocks(n, 64)];
        let mut int8 = vec![0i8; n];
        let mut scb = vec![0f32; rows];
        for threads in [1, 2] {
            // "-generic": the portable packing loop (auto-vectorized), where BF16 has an
            // AVX-512 one: both in one binary, to compare
            for mode in ["nf4", "fp4", "int8", "nf4-generic", "fp4-generic"] {
                let generic = mode.ends_with("-generic");
                quant::FORCE_GENERIC_PACKING.store(generic, std::sync::atomic::Ordering::Relaxed);
                let (best, median) = time(reps, || match mode {
                    "int8" => {
                        quant::quantize_int8(
                            &input,
                            Dtype::BF16,
                            cols,
                            &mut int8,
                            &mut scb,
                            threads,
                        )
                        .unwrap();
                        black_box((&int8, &scb));
                    }
                    _ => {
                        let qt = QuantType::parse(mode.trim_end_matches("-generic")).unwrap();
                        quant::quantize_4bit(
                            &input,
                            Dtype::BF16,
                            qt,
                            64,
                            &mut packed,
                            &mut absmax,
                            threads,
                        )
                        .unwrap();
                        black_box((&packed, &absmax));
                    }
                });
                println!(
                    "{mode}\t{rows}x{cols}\t{threads}\t{:.3}\t{:.3}",
                    gb / best,
                    gb / median
                );
            }
        }
    }
}
