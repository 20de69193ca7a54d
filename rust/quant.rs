//! Native CPU quantizers, bit-identical to bitsandbytes' CPU kernels. No Python.
//!
//! * [`quantize_4bit`]: blockwise NF4 / FP4, as `bitsandbytes.functional.quantize_4bit`
//!   (the `default` torch kernel of `bitsandbytes/backends/default/ops.py`): per block
//!   `absmax = max(|x|)` in f32; full blocks are scaled by `x * (1 / max(absmax, 1e-38))`,
//!   the last partial block by a true division `x / max(absmax, 1e-38)` (and its stored
//!   absmax is the clamped one); each value goes to `bucketize(value, midpoints)`
//!   (`right=False`: the number of midpoints that are not `>=` the value, so NaN lands in
//!   the last bucket), FP4 indices are remapped through the code book's sort order, an
//!   odd element count is padded with `0.0`, and pairs are packed `q[2i] << 4 | q[2i+1]`.
//! * [`quantize_int8`]: LLM.int8 row-wise, as `Int8Params._quantize` on the CPU: the
//!   weight is cast to f16 (round to nearest even), `scb = max(|row|)` (f16, then f32),
//!   `q = round_half_even(x * ((1 / scb) * 127))` in f32, NaN → 0.
//!
//! Inputs are raw little-endian BF16, F16 or F32 bytes (e.g. a tensor's bytes in a
//! mapped shard), converted element by element inside the loops; nothing is staged.
//! The kernels write into caller-provided output slices and split the work over
//! `threads` scoped threads (blocks or rows never straddle two threads, so the result
//! does not depend on the thread count).
//!
//! Speed comes from the loops' shape: the absmax pass is an integer max over `|x|` bit
//! patterns (which order like the values, NaN above inf), and the bucketize is 15
//! branch-free compares whose results are summed, which LLVM vectorizes for any target.
//! On x86-64 the same generic code is also compiled with AVX2 and AVX-512 enabled and
//! picked at run time (no `-C target-cpu` needed). BF16 (what checkpoints hold) has
//! its own AVX-512 loop: a 16-bit absmax pass, and a bucketize that looks up the
//! value's 1/16-wide cell and makes one compare (NF4, whose midpoints are at least
//! 0.085 apart) or a 4-step binary search (FP4): 3-4x the generic loop, same bits.
//!
//! NaN payloads follow torch 2.x on x86-64 as well, so that absmax and SCB compare equal
//! bit for bit: a full block's absmax is its first NaN with the sign cleared (an F16 NaN
//! quieted, payload kept, as F16C converts it); a partial block's is the all-ones NaN
//! `0xFFFF_FFFF` that torch's vectorized full reduction produces (a lone element: that
//! NaN, quieted; for F16 `0x7FFF_FFFF`); an int8 row's SCB is its first NaN converted
//! like F16C, except in the last `rows % 8` rows, which torch converts with its scalar
//! path (`0x7FFF_FFFF`). These last rules model torch splitting a conversion into
//! eight-element vectors in one thread; a multi-threaded torch may split very large F16
//! tensors elsewhere, and then a NaN's payload (never its NaN-ness) may differ.

use crate::header::Dtype;
use std::fmt;
use std::thread;

/// Block sizes bitsandbytes accepts for 4-bit quantization.
pub const BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// Elements per batch of blocks in the 4-bit loops (fits L1 with its output).
const BATCH: usize = 4096;

/// Fewest elements given to one thread: below this, spawning costs more than it saves.
const MIN_PER_THREAD: usize = 1 << 16;

/// A 4-bit code book.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantType {
    Nf4,
    Fp4,
}

impl QuantType {
    pub fn parse(s: &str) -> Option<QuantType> {
        match s {
            "nf4" => Some(QuantType::Nf4),
            "fp4" => Some(QuantType::Fp4),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }

    /// The 16 code values, by 4-bit index (`bitsandbytes.functional.get_4bit_type`).
    pub fn code(self) -> [f32; 16] {
        match self {
            QuantType::Nf4 => NF4_CODE,
            QuantType::Fp4 => FP4_CODE,
        }
    }

    /// The 15 midpoints between sorted code values (`_get_4bit_quantize_bounds`).
    pub fn bounds(self) -> [f32; 15] {
        match self {
            QuantType::Nf4 => Nf4::BOUNDS,
            QuantType::Fp4 => Fp4::BOUNDS,
        }
    }

    /// `argsort(code)`: bucket `i` of [`bounds`](Self::bounds) is 4-bit index `order[i]`.
    pub fn order(self) -> [u8; 16] {
        match self {
            QuantType::Nf4 => NF4_ORDER,
            QuantType::Fp4 => FP4_ORDER,
        }
    }
}

impl fmt::Display for QuantType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a quantizer call was refused (nothing is written then).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuantError {
    /// Only BF16, F16 and F32 inputs are quantized.
    Dtype(Dtype),
    /// A 4-bit block size that bitsandbytes does not accept.
    Blocksize(usize),
    /// The input's byte length is not a whole number of elements.
    InputBytes { dtype: Dtype, bytes: usize },
    /// An int8 input that is not a whole number of rows of `cols`.
    Rows { elements: usize, cols: usize },
    /// An output slice of the wrong length.
    OutputLen {
        what: &'static str,
        expected: usize,
        got: usize,
    },
}

impl fmt::Display for QuantError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QuantError::Dtype(d) => write!(f, "cannot quantize {d}: only BF16, F16 and F32"),
            QuantError::Blocksize(b) => write!(
                f,
                "blocksize must be one of {BLOCKSIZES:?} (as bitsandbytes), not {b}"
            ),
            QuantError::InputBytes { dtype, bytes } => write!(
                f,
                "{bytes} bytes is not a whole number of {dtype} elements ({} bytes each)",
                dtype.bits() / 8
            ),
            QuantError::Rows { elements, cols } => write!(
                f,
                "{elements} elements are not a whole number of rows of {cols} columns"
            ),
            QuantError::OutputLen {
                what,
                expected,
                got,
            } => write!(f, "{what} must have {expected} elements, not {got}"),
        }
    }
}

impl std::error::Error for QuantError {}

/// Number of 4-bit blocks (absmax values) for `n` elements.
pub fn blocks(n: usize, blocksize: usize) -> usize {
    n.div_ceil(blocksize)
}

/// Bytes of packed 4-bit output for `n` elements (two per byte, odd `n` padded).
pub fn packed_len(n: usize) -> usize {
    n.div_ceil(2)
}

/// Bytes of one input element: the quantizer reads BF16, F16 and F32.
pub fn input_size(dtype: Dtype) -> Result<usize, QuantError> {
    match dtype {
        Dtype::BF16 | Dtype::F16 => Ok(2),
        Dtype::F32 => Ok(4),
        other => Err(QuantError::Dtype(other)),
    }
}

fn element_count(input: &[u8], dtype: Dtype) -> Result<usize, QuantError> {
    let size = input_size(dtype)?;
    if !input.len().is_multiple_of(size) {
        return Err(QuantError::InputBytes {
            dtype,
            bytes: input.len(),
        });
    }
    Ok(input.len() / size)
}

fn check_len(what: &'static str, expected: usize, got: usize) -> Result<(), QuantError> {
    if expected == got {
        Ok(())
    } else {
        Err(QuantError::OutputLen {
            what,
            expected,
            got,
        })
    }
}

/// How many threads to use for `elements` of work split in `units` pieces.
fn thread_count(threads: usize, elements: usize, units: usize) -> usize {
    threads
        .max(1)
        .min(elements / MIN_PER_THREAD + 1)
        .min(units.max(1))
}

type Kernel4bit = fn(&[u8], usize, &mut [u8], &mut [f32], usize);
type KernelInt8 = fn(&[u8], usize, &mut [i8], &mut [f32], usize);

/// Quantize `input` (raw little-endian `dtype` elements) to 4 bits, blockwise.
///
/// `packed` receives [`packed_len`] bytes and `absmax` one f32 per block
/// ([`blocks`]), exactly what `quantize_4bit(A, blocksize, quant_type,
/// compress_statistics=False)` returns on the CPU (before any `quant_storage` view).
pub fn quantize_4bit(
    input: &[u8],
    dtype: Dtype,
    quant_type: QuantType,
    blocksize: usize,
    packed: &mut [u8],
    absmax: &mut [f32],
    threads: usize,
) -> Result<(), QuantError> {
    let n = element_count(input, dtype)?;
    if !BLOCKSIZES.contains(&blocksize) {
        return Err(QuantError::Blocksize(blocksize));
    }
    check_len("packed output", packed_len(n), packed.len())?;
    check_len("absmax", blocks(n, blocksize), absmax.len())?;
    let kernel: Kernel4bit = match (dtype, quant_type) {
        (Dtype::BF16, QuantType::Nf4) => run_4bit::<Bf16, Nf4>,
        (Dtype::BF16, QuantType::Fp4) => run_4bit::<Bf16, Fp4>,
        (Dtype::F16, QuantType::Nf4) => run_4bit::<F16, Nf4>,
        (Dtype::F16, QuantType::Fp4) => run_4bit::<F16, Fp4>,
        (Dtype::F32, QuantType::Nf4) => run_4bit::<F32, Nf4>,
        (Dtype::F32, QuantType::Fp4) => run_4bit::<F32, Fp4>,
        _ => unreachable!("element_count accepts BF16, F16 and F32 only"),
    };
    kernel(input, blocksize, packed, absmax, threads);
    Ok(())
}

/// LLM.int8 row-wise quantization of a row-major matrix with `cols` columns.
///
/// `out` receives one int8 per element and `scb` one f32 per row: what
/// `int8_vectorwise_quant(A.to(torch.float16))` returns on the CPU (`CB`, `SCB`).
pub fn quantize_int8(
    input: &[u8],
    dtype: Dtype,
    cols: usize,
    out: &mut [i8],
    scb: &mut [f32],
    threads: usize,
) -> Result<(), QuantError> {
    let n = element_count(input, dtype)?;
    if cols == 0 || !n.is_multiple_of(cols) {
        return Err(QuantError::Rows { elements: n, cols });
    }
    check_len("int8 output", n, out.len())?;
    check_len("row statistics", n / cols, scb.len())?;
    let kernel: KernelInt8 = match dtype {
        Dtype::BF16 => run_int8::<Bf16>,
        Dtype::F16 => run_int8::<F16>,
        Dtype::F32 => run_int8::<F32>,
        _ => unreachable!("element_count accepts BF16, F16 and F32 only"),
    };
    kernel(input, cols, out, scb, threads);
    Ok(())
}

// --- element types ------------------------------------------------------------

/// One input element type: how to read it, order it by magnitude, and convert it.
trait Source {
    /// Bytes per element.
    const BYTES: usize;
    /// Which one it is, for the SIMD loops written per element type (x86-64: an
    /// AVX-512 packing loop for BF16; aarch64: NEON loads and conversions).
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    const KIND: Kind;
    /// Largest [`key`](Self::key) of a non-NaN element (`|inf|`).
    const INF_KEY: u32;
    /// `|x|`'s bit pattern: keys order like magnitudes, NaNs above `INF_KEY`.
    fn key(b: &[u8]) -> u32;
    /// The f32 value of a non-NaN key (exact).
    fn key_value(key: u32) -> f32;
    /// `x.float()` as torch computes it (exact; a NaN's payload is not kept).
    fn load(b: &[u8]) -> f32;
    /// [`load`](Self::load) of two consecutive elements.
    #[inline(always)]
    fn load_pair(b: &[u8]) -> (f32, f32) {
        let (x, y) = b.split_at(Self::BYTES);
        (Self::load(x), Self::load(y))
    }
    /// `x.float().abs()` of a NaN element, bit for bit (torch's vectorized conversion).
    fn nan_abs(b: &[u8]) -> f32;
    /// `x.to(torch.float16)`, bit for bit.
    fn to_f16(b: &[u8]) -> u16;
    /// `x.to(torch.float16).float()`, exact (a NaN's payload is not kept).
    fn half(b: &[u8]) -> f32;
    /// The absmax torch stores for a one-element last block holding a NaN: the
    /// element's `.float().abs()`, quieted by `max()`.
    fn lone_nan_abs(b: &[u8]) -> f32 {
        f32::from_bits(Self::nan_abs(b).to_bits() | QUIET)
    }
}

const QUIET: u32 = 0x0040_0000;

/// The element type of a [`Source`], as a value the SIMD loops can match on.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bf16,
    F16,
    F32,
}

#[inline(always)]
fn u16_le(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}

#[inline(always)]
fn u32_le(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

struct Bf16;
struct F16;
struct F32;

impl Source for Bf16 {
    const BYTES: usize = 2;
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    const KIND: Kind = Kind::Bf16;
    const INF_KEY: u32 = 0x7f80;
    #[inline(always)]
    fn key(b: &[u8]) -> u32 {
        u32::from(u16_le(b) & 0x7fff)
    }
    #[inline(always)]
    fn key_value(key: u32) -> f32 {
        f32::from_bits(key << 16)
    }
    #[inline(always)]
    fn load(b: &[u8]) -> f32 {
        f32::from_bits(u32::from(u16_le(b)) << 16)
    }
    #[inline(always)]
    fn load_pair(b: &[u8]) -> (f32, f32) {
        // one 32-bit load holds both: the first element in the low half
        let w = u32_le(b);
        (f32::from_bits(w << 16), f32::from_bits(w & 0xffff_0000))
    }
    fn nan_abs(b: &[u8]) -> f32 {
        f32::from_bits((u32::from(u16_le(b)) << 16) & 0x7fff_ffff)
    }
    #[inline(always)]
    fn to_f16(b: &[u8]) -> u16 {
        f32_to_f16(Self::load(b))
    }
    #[inline(always)]
    fn half(b: &[u8]) -> f32 {
        round_to_f16(Self::load(b))
    }
}

impl Source for F16 {
    const BYTES: usize = 2;
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    const KIND: Kind = Kind::F16;
    const INF_KEY: u32 = 0x7c00;
    #[inline(always)]
    fn key(b: &[u8]) -> u32 {
        u32::from(u16_le(b) & 0x7fff)
    }
    #[inline(always)]
    fn key_value(key: u32) -> f32 {
        f16_to_f32(key as u16)
    }
    #[inline(always)]
    fn load(b: &[u8]) -> f32 {
        f16_to_f32(u16_le(b))
    }
    fn nan_abs(b: &[u8]) -> f32 {
        f32::from_bits(f16_to_f32(u16_le(b)).to_bits() & 0x7fff_ffff)
    }
    fn lone_nan_abs(_: &[u8]) -> f32 {
        // A lone last element is in the scalar tail of torch's F16 → F32 copy,
        // which turns every NaN into 0x7FFF_FFFF.
        f32::from_bits(0x7fff_ffff)
    }
    #[inline(always)]
    fn to_f16(b: &[u8]) -> u16 {
        u16_le(b)
    }
    #[inline(always)]
    fn half(b: &[u8]) -> f32 {
        Self::load(b)
    }
}

impl Source for F32 {
    const BYTES: usize = 4;
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    const KIND: Kind = Kind::F32;
    const INF_KEY: u32 = 0x7f80_0000;
    #[inline(always)]
    fn key(b: &[u8]) -> u32 {
        u32_le(b) & 0x7fff_ffff
    }
    #[inline(always)]
    fn key_value(key: u32) -> f32 {
        f32::from_bits(key)
    }
    #[inline(always)]
    fn load(b: &[u8]) -> f32 {
        f32::from_bits(u32_le(b))
    }
    fn nan_abs(b: &[u8]) -> f32 {
        f32::from_bits(u32_le(b) & 0x7fff_ffff)
    }
    #[inline(always)]
    fn to_f16(b: &[u8]) -> u16 {
        f32_to_f16(Self::load(b))
    }
    #[inline(always)]
    fn half(b: &[u8]) -> f32 {
        round_to_f16(Self::load(b))
    }
}

/// f16 bits → f32, exact for every non-NaN value; a NaN is quieted and keeps its
/// payload (what x86 F16C `vcvtph2ps`, torch's vectorized conversion, does).
/// Branch-free so that it vectorizes.
#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    let h = u32::from(h);
    let sign = (h & 0x8000) << 16;
    let magnitude = h & 0x7fff;
    let mantissa = h & 0x03ff;
    // rebias the exponent from 15 to 127
    let normal = (magnitude << 13) + 0x3800_0000;
    // subnormal: mantissa * 2^-24, exact in f32
    let subnormal = (mantissa as f32 * (1.0 / 16_777_216.0)).to_bits();
    let quiet = if mantissa != 0 { QUIET } else { 0 };
    let inf_nan = 0x7f80_0000 | (mantissa << 13) | quiet;
    let bits = if magnitude >= 0x7c00 {
        inf_nan
    } else if magnitude >= 0x0400 {
        normal
    } else {
        subnormal
    };
    f32::from_bits(sign | bits)
}

/// f32 → f16 bits, round to nearest even (torch's `.to(torch.float16)`): overflow
/// gives ±inf, a NaN is quieted and keeps its top payload bits (F16C `vcvtps2ph`).
/// Branch-free so that it vectorizes.
#[inline(always)]
pub fn f32_to_f16(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = (bits >> 16) & 0x8000;
    let a = bits & 0x7fff_ffff;
    // normal range: rebias the exponent from 127 to 15, then round the 13 dropped bits
    let r = a.wrapping_sub(0x3800_0000);
    let normal = (r.wrapping_add(0x0fff + ((r >> 13) & 1))) >> 13;
    // subnormal range: let the FPU round |x| onto the 2^-24 grid of 0.5's ulp
    let subnormal = (f32::from_bits(a) + 0.5)
        .to_bits()
        .wrapping_sub(0x3f00_0000);
    let nan = 0x7e00 | ((a >> 13) & 0x03ff);
    let h = if a > 0x7f80_0000 {
        nan
    } else if a >= 0x477f_f000 {
        0x7c00 // 65520 and above round to inf
    } else if a >= 0x3880_0000 {
        normal
    } else {
        subnormal
    };
    (sign | h) as u16
}

/// `f16_to_f32(f32_to_f16(x))` without leaving f32: the mantissa rounded to 10
/// bits (to the 2^-24 grid below 2^-14), to nearest even, 65520 and above to inf.
/// A NaN stays a NaN (payload not kept). Branch-free so that it vectorizes.
#[inline(always)]
pub fn round_to_f16(x: f32) -> f32 {
    let bits = x.to_bits();
    let a = bits & 0x7fff_ffff;
    let normal = a.wrapping_add(0x0fff + ((a >> 13) & 1)) & 0xffff_e000;
    // below 2^-14 the FPU rounds |x| onto the 2^-24 grid of 0.5's ulp
    let subnormal = ((f32::from_bits(a) + 0.5) - 0.5).to_bits();
    let r = if a > 0x7f80_0000 {
        a
    } else if a >= 0x477f_f000 {
        0x7f80_0000
    } else if a >= 0x3880_0000 {
        normal
    } else {
        subnormal
    };
    f32::from_bits((bits & 0x8000_0000) | r)
}

// --- code books -----------------------------------------------------------------

const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.6961928,
    -0.52507305,
    -0.3949175,
    -0.28444138,
    -0.18477343,
    -0.091050036,
    0.0,
    0.0795803,
    0.1609302,
    0.2461123,
    0.33791524,
    0.44070983,
    0.562617,
    0.72295684,
    1.0,
];
const NF4_ORDER: [u8; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];

const FP4_CODE: [f32; 16] = [
    0.0,
    0.0052083335,
    0.6666667,
    1.0,
    0.33333334,
    0.5,
    0.16666667,
    0.25,
    0.0,
    -0.0052083335,
    -0.6666667,
    -1.0,
    -0.33333334,
    -0.5,
    -0.16666667,
    -0.25,
];
/// `torch.argsort(code)` as bitsandbytes computes it (the two zeros: 0 before 8).
const FP4_ORDER: [u8; 16] = [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3];

/// A code book as the quantizer uses it: the midpoints, and the 4-bit index of
/// bucket `i` written as `BASE + STEPS[0] + ... + STEPS[i-1]`, so that the index
/// is a sum of per-midpoint terms (no table lookup in the vectorized loop).
trait Code {
    const BOUNDS: [f32; 15];
    const BASE: i32;
    const STEPS: [i32; 15];
    /// `argsort(code)`: the 4-bit index of each bucket.
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64", test))]
    const ORDER: [u8; 16];
    /// [`cells`] of the midpoints, where they allow it.
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64", test))]
    const CELLS: Option<[i32; 32]> = cells(Self::BOUNDS);
    /// `ORDER` is the identity (the bucket is the 4-bit index).
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64", test))]
    const SORTED: bool = is_identity(Self::ORDER);
}

/// How far (in value) the cell of `v` computed in f32 may be from the exact one:
/// `fma(v, 16, 16)` is within half an ulp of 32 (2^-19) of `16 v + 16`, 2^-23 in `v`.
/// Far more than that, so that the proof does not rest on the last bit.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64", test))]
const CELL_MARGIN: f32 = 1e-5;

/// A shortcut for bucketize over `[-1, 1]` cut in 32 cells of 1/16: for cell `c`
/// (`v` in `[c/16 - 1, (c+1)/16 - 1)`, `v < -1` in cell 0, `v >= 1` and NaN in 31),
/// the number of midpoints below the whole cell, so that bucketize of any `v` in the
/// cell is that number, plus one if the midpoint of that number (the cell's only
/// possible midpoint) is not `>=` `v`. `None` when a cell (widened by [`CELL_MARGIN`])
/// holds two midpoints, as FP4's cells near zero do; cells above every midpoint say
/// 14 (the last midpoint is below them, so the compare adds the fifteenth: NaN too).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64", test))]
const fn cells(bounds: [f32; 15]) -> Option<[i32; 32]> {
    let mut out = [0i32; 32];
    let mut c = 0;
    while c < 32 {
        let lo = c as f32 / 16.0 - 1.0 - CELL_MARGIN;
        let hi = (c + 1) as f32 / 16.0 - 1.0 + CELL_MARGIN;
        let (mut below, mut inside) = (0, 0);
        let mut k = 0;
        while k < 15 {
            if bounds[k] < lo {
                below += 1;
            } else if bounds[k] <= hi {
                inside += 1;
            }
            k += 1;
        }
        if inside > 1 || (below == 15 && inside > 0) {
            return None;
        }
        out[c] = if below > 14 { 14 } else { below };
        c += 1;
    }
    // the NaN cell must compare with the last midpoint, below it
    if bounds[14] >= 31.0 / 16.0 - 1.0 - CELL_MARGIN {
        return None;
    }
    Some(out)
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64", test))]
const fn is_identity(order: [u8; 16]) -> bool {
    let mut i = 0;
    while i < 16 {
        if order[i] as usize != i {
            return false;
        }
        i += 1;
    }
    true
}

struct Nf4;
struct Fp4;

impl Code for Nf4 {
    const BOUNDS: [f32; 15] = [
        -0.8480964,
        -0.6106329,
        -0.45999527,
        -0.33967942,
        -0.2346074,
        -0.13791174,
        -0.045525018,
        0.03979015,
        0.12025525,
        0.20352125,
        0.29201376,
        0.38931254,
        0.50166345,
        0.6427869,
        0.86147845,
    ];
    const BASE: i32 = 0;
    const STEPS: [i32; 15] = [1; 15];
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64", test))]
    const ORDER: [u8; 16] = NF4_ORDER;
}

impl Code for Fp4 {
    const BOUNDS: [f32; 15] = [
        -0.8333334,
        -0.5833334,
        -0.4166667,
        -0.2916667,
        -0.20833334,
        -0.0859375,
        -0.0026041667,
        0.0,
        0.0026041667,
        0.0859375,
        0.20833334,
        0.2916667,
        0.4166667,
        0.5833334,
        0.8333334,
    ];
    const BASE: i32 = FP4_ORDER[0] as i32;
    const STEPS: [i32; 15] = steps(FP4_ORDER);
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64", test))]
    const ORDER: [u8; 16] = FP4_ORDER;
}

const fn steps(order: [u8; 16]) -> [i32; 15] {
    let mut out = [0; 15];
    let mut i = 0;
    while i < 15 {
        out[i] = order[i + 1] as i32 - order[i] as i32;
        i += 1;
    }
    out
}

/// `order[bucketize(v, BOUNDS)]`: bucketize (`right=False`) is the number of bounds
/// for which `bound >= v` is false; for NaN that is all 15 of them.
#[inline(always)]
#[allow(clippy::neg_cmp_op_on_partial_ord)]
fn index<C: Code>(v: f32) -> u32 {
    let mut i = C::BASE;
    for k in 0..15 {
        // `!(b >= v)`, not `b < v`: NaN must count
        if !(C::BOUNDS[k] >= v) {
            i += C::STEPS[k];
        }
    }
    i as u32
}

/// `clamp(min=1e-38)` of torch: NaN stays NaN.
#[inline(always)]
fn clamp_min(m: f32) -> f32 {
    if m < 1e-38 {
        1e-38
    } else {
        m
    }
}

// --- 4-bit ------------------------------------------------------------------------

fn run_4bit<S: Source, C: Code>(
    input: &[u8],
    bs: usize,
    packed: &mut [u8],
    absmax: &mut [f32],
    threads: usize,
) {
    let n = input.len() / S::BYTES;
    let full = n / bs;
    let split = full * bs;
    let (full_in, tail_in) = input.split_at(split * S::BYTES);
    let (full_out, tail_out) = packed.split_at_mut(split / 2);
    let (full_absmax, tail_absmax) = absmax.split_at_mut(full);
    let threads = thread_count(threads, split, full);
    if threads <= 1 {
        full_blocks::<S, C>(full_in, bs, full_out, full_absmax);
    } else {
        let per = full.div_ceil(threads);
        thread::scope(|s| {
            let mut work = full_in
                .chunks(per * bs * S::BYTES)
                .zip(full_out.chunks_mut(per * bs / 2))
                .zip(full_absmax.chunks_mut(per));
            let first = work.next();
            for ((i, o), a) in work {
                s.spawn(move || full_blocks::<S, C>(i, bs, o, a));
            }
            if let Some(((i, o), a)) = first {
                full_blocks::<S, C>(i, bs, o, a);
            }
        });
    }
    if let Some(am) = tail_absmax.first_mut() {
        partial_block::<S, C>(tail_in, tail_out, am);
    }
}

/// Full blocks, with the fastest instruction set this CPU has.
fn full_blocks<S: Source, C: Code>(input: &[u8], bs: usize, packed: &mut [u8], absmax: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
        {
            if S::KIND == Kind::Bf16
                && !FORCE_GENERIC_PACKING.load(std::sync::atomic::Ordering::Relaxed)
            {
                // SAFETY: as below.
                return unsafe { x86::full_blocks_avx512_bf16::<S, C>(input, bs, packed, absmax) };
            }
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { x86::full_blocks_avx512::<S, C>(input, bs, packed, absmax) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { x86::full_blocks_avx2::<S, C>(input, bs, packed, absmax) };
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        // NEON is part of the aarch64 baseline; checked all the same, as the x86 ones are
        if std::arch::is_aarch64_feature_detected!("neon")
            && !FORCE_GENERIC_PACKING.load(std::sync::atomic::Ordering::Relaxed)
        {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { neon::full_blocks_neon::<S, C>(input, bs, packed, absmax) };
        }
    }
    full_blocks_generic::<S, C>(input, bs, packed, absmax);
}

/// Tests (and benchmarks) compare the hand-written SIMD loops with the generic ones:
/// on x86-64 the AVX-512 BF16 packing loop, on aarch64 every NEON loop (4-bit and int8).
#[doc(hidden)]
pub static FORCE_GENERIC_PACKING: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{
        clamp_min, first_nan, full_blocks_generic, int8_rows_generic, Code, Kind, Source, BATCH,
        BLOCKSIZES,
    };
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    pub(super) unsafe fn full_blocks_avx512<S: Source, C: Code>(
        input: &[u8],
        bs: usize,
        packed: &mut [u8],
        absmax: &mut [f32],
    ) {
        full_blocks_generic::<S, C>(input, bs, packed, absmax);
    }

    /// BF16 input: per batch of blocks (as [`full_blocks_generic`]), the absmax pass
    /// [`absmax_bf16`], then the packing loop: [`pack_batch_bf16_cells`] where the code
    /// book has [`Code::CELLS`] (NF4), else [`pack_batch_bf16`]. The next batch is
    /// prefetched while one is packed, so that its first read does not wait on memory.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    pub(super) unsafe fn full_blocks_avx512_bf16<S: Source, C: Code>(
        input: &[u8],
        bs: usize,
        packed: &mut [u8],
        absmax: &mut [f32],
    ) {
        debug_assert!(S::KIND == Kind::Bf16 && bs.is_multiple_of(32));
        let per_batch = (BATCH / bs).max(1);
        let batch_bytes = per_batch * bs * 2;
        let batches = input
            .chunks(batch_bytes)
            .zip(packed.chunks_mut(per_batch * bs / 2))
            .zip(absmax.chunks_mut(per_batch));
        let mut scales = [0f32; BATCH / BLOCKSIZES[0]];
        for ((input, packed), absmax) in batches {
            unsafe { absmax_bf16::<S>(input, bs, absmax) };
            for (scale, &am) in scales.iter_mut().zip(absmax.iter()) {
                // torch: `1.0 / t` is `t.reciprocal() * 1.0`
                *scale = 1.0 / clamp_min(am);
            }
            let scales = &scales[..absmax.len()];
            // SAFETY: prefetches never fault; the address is only formed, not read
            let next = input.as_ptr().wrapping_add(batch_bytes);
            match C::CELLS {
                Some(cells) => unsafe {
                    pack_batch_bf16_cells::<C>(input, bs, scales, packed, &cells, next)
                },
                None => unsafe { pack_batch_bf16::<C>(input, bs, scales, packed, next) },
            }
        }
    }

    /// Each block's absmax: the largest `|x|` bit pattern (`x & 0x7fff`, which orders
    /// like the magnitude, NaN above inf) by 16-bit unsigned max over 32 values at a
    /// time, then across the vector with `phminposuw` on the complement.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    unsafe fn absmax_bf16<S: Source>(input: &[u8], bs: usize, absmax: &mut [f32]) {
        let magnitude = _mm512_set1_epi16(0x7fff);
        for (block, am) in input.chunks_exact(bs * 2).zip(absmax.iter_mut()) {
            let mut m = _mm512_setzero_si512();
            for chunk in block.chunks_exact(64) {
                // SAFETY: 64 readable bytes
                let w = unsafe { _mm512_loadu_si512(chunk.as_ptr().cast()) };
                m = _mm512_max_epu16(m, _mm512_and_si512(w, magnitude));
            }
            let m = _mm256_max_epu16(_mm512_castsi512_si256(m), _mm512_extracti64x4_epi64::<1>(m));
            let m = _mm_max_epu16(_mm256_castsi256_si128(m), _mm256_extracti128_si256::<1>(m));
            let least = _mm_minpos_epu16(_mm_xor_si128(m, _mm_set1_epi16(-1)));
            let key = !(_mm_cvtsi128_si32(least) as u32) & 0xffff;
            *am = if key > S::INF_KEY {
                first_nan::<S>(block)
            } else {
                S::key_value(key)
            };
        }
    }

    /// Bucketize with [`Code::CELLS`]: the cell of `v` (`fma(v, 16, 16)`, clamped to
    /// `[0, 31]` with NaN going to 31, truncated), the cell's count of midpoints below
    /// it (`vpermt2d` over the 32 cells), plus one where that count's midpoint is not
    /// `>=` `v` (`!(b >= v)`, true for NaN as bucketize's count is), through the code
    /// book's order unless it is the identity. Three shuffles and one compare for 16
    /// values, against four compares and five shuffles for the binary search.
    #[inline(always)]
    unsafe fn bucket_cells<C: Code>(
        v: __m512,
        cells: (__m512i, __m512i),
        bounds: __m512,
    ) -> __m512i {
        let t = _mm512_fmadd_ps(v, _mm512_set1_ps(16.0), _mm512_set1_ps(16.0));
        // `vminps` gives its second operand where either is NaN: NaN → 31
        let t = _mm512_min_ps(t, _mm512_set1_ps(31.0));
        let t = _mm512_max_ps(t, _mm512_setzero_ps());
        let cell = _mm512_cvttps_epi32(t);
        let below = _mm512_permutex2var_epi32(cells.0, cell, cells.1);
        let bound = _mm512_permutexvar_ps(below, bounds);
        let above = _mm512_cmp_ps_mask::<_CMP_NGE_UQ>(bound, v);
        let bucket = _mm512_mask_add_epi32(below, above, below, _mm512_set1_epi32(1));
        if C::SORTED {
            bucket
        } else {
            let order: [i32; 16] = C::ORDER.map(i32::from);
            // SAFETY: a 16-element array
            _mm512_permutexvar_epi32(bucket, unsafe { _mm512_loadu_si512(order.as_ptr().cast()) })
        }
    }

    /// [`pack_blocks_bf16`] with [`bucket_cells`] for the bucketize.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    unsafe fn pack_batch_bf16_cells<C: Code>(
        input: &[u8],
        bs: usize,
        scales: &[f32],
        packed: &mut [u8],
        cells: &[i32; 32],
        next: *const u8,
    ) {
        let mut bounds = [f32::INFINITY; 16];
        bounds[..15].copy_from_slice(&C::BOUNDS);
        // SAFETY: 16-element arrays, unaligned loads
        let (bounds, cells) = unsafe {
            (
                _mm512_loadu_ps(bounds.as_ptr()),
                (
                    _mm512_loadu_si512(cells.as_ptr().cast()),
                    _mm512_loadu_si512(cells[16..].as_ptr().cast()),
                ),
            )
        };
        // SAFETY: `bucket_cells` is inlined here, where the CPU has AVX-512
        let bucket = |v: __m512| unsafe { bucket_cells::<C>(v, cells, bounds) };
        unsafe { pack_blocks_bf16(input, bs, scales, packed, next, bucket) };
    }

    /// [`bucket_cells`] of each value, for tests: `values.len()` a multiple of 16.
    #[cfg(test)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    pub(super) unsafe fn buckets_by_cells<C: Code>(values: &[f32]) -> Vec<u32> {
        let cells = C::CELLS.expect("a code book with cells");
        let mut bounds = [f32::INFINITY; 16];
        bounds[..15].copy_from_slice(&C::BOUNDS);
        let mut out = vec![0u32; values.len()];
        // SAFETY: 16-element arrays and chunks
        unsafe {
            let bounds = _mm512_loadu_ps(bounds.as_ptr());
            let cells = (
                _mm512_loadu_si512(cells.as_ptr().cast()),
                _mm512_loadu_si512(cells[16..].as_ptr().cast()),
            );
            for (v, o) in values.chunks_exact(16).zip(out.chunks_exact_mut(16)) {
                let b = bucket_cells::<C>(_mm512_loadu_ps(v.as_ptr()), cells, bounds);
                _mm512_storeu_si512(o.as_mut_ptr().cast(), b);
            }
        }
        out
    }

    /// [`pack_blocks_bf16`] with a 4-step binary search over the 15 sorted midpoints for
    /// the bucketize (`vpermps` picks each lane's midpoint) with the predicate
    /// `!(bound >= v)`, true for NaN as bucketize's count is: for sorted midpoints that
    /// count is where the search ends. The bucket goes through the code book's order
    /// (`vpermd`). `input` is whole blocks of `bs` values (a multiple of 32), `scales` one
    /// per block.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    pub(super) unsafe fn pack_batch_bf16<C: Code>(
        input: &[u8],
        bs: usize,
        scales: &[f32],
        packed: &mut [u8],
        next: *const u8,
    ) {
        debug_assert!(bs.is_multiple_of(32));
        let mut bounds = [f32::INFINITY; 16];
        bounds[..15].copy_from_slice(&C::BOUNDS);
        let order: [i32; 16] = C::ORDER.map(i32::from);
        // SAFETY: 16-element arrays, unaligned loads
        let bounds = unsafe { _mm512_loadu_ps(bounds.as_ptr()) };
        let order = unsafe { _mm512_loadu_si512(order.as_ptr().cast()) };
        let bucket = |v: __m512| -> __m512i {
            let mut idx = _mm512_setzero_si512();
            for step in [8, 4, 2, 1] {
                let at = _mm512_add_epi32(idx, _mm512_set1_epi32(step - 1));
                let bound = _mm512_permutexvar_ps(at, bounds);
                let below = _mm512_cmp_ps_mask::<_CMP_NGE_UQ>(bound, v);
                idx = _mm512_mask_add_epi32(idx, below, idx, _mm512_set1_epi32(step));
            }
            _mm512_permutexvar_epi32(idx, order)
        };
        unsafe { pack_blocks_bf16(input, bs, scales, packed, next, bucket) };
    }

    /// The packing loop both bucketizes share, for BF16 blocks with AVX-512: 32 values
    /// (16 packed bytes) at a time. A 32-bit load holds two consecutive values (the first
    /// in its low half), so the even and the odd values are one shift and one mask away
    /// as f32 vectors; each is scaled (`x * scale`, the same f32 product) and bucketized
    /// by `bucket`, and `even << 4 | odd` is narrowed to bytes (`vpmovdb`). The line
    /// `next` points to (the next batch, read one line per line packed) is prefetched.
    /// Inlined into its callers, which have AVX-512 enabled.
    #[inline(always)]
    unsafe fn pack_blocks_bf16(
        input: &[u8],
        bs: usize,
        scales: &[f32],
        packed: &mut [u8],
        next: *const u8,
        bucket: impl Fn(__m512) -> __m512i,
    ) {
        let high = _mm512_set1_epi32(0xffff_0000u32 as i32);
        let blocks = input
            .chunks_exact(bs * 2)
            .zip(packed.chunks_exact_mut(bs / 2))
            .zip(scales);
        let mut ahead = next;
        for ((block, out), &scale) in blocks {
            let scale = _mm512_set1_ps(scale);
            for (chunk, dst) in block.chunks_exact(64).zip(out.chunks_exact_mut(16)) {
                // SAFETY: a prefetch never faults; the address is only formed, not read
                unsafe { _mm_prefetch::<_MM_HINT_T0>(ahead.cast()) };
                ahead = ahead.wrapping_add(64);
                // SAFETY: 64 readable bytes, 16 writable ones
                let w = unsafe { _mm512_loadu_si512(chunk.as_ptr().cast()) };
                let even = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(w));
                let odd = _mm512_castsi512_ps(_mm512_and_si512(w, high));
                let hi = bucket(_mm512_mul_ps(even, scale));
                let lo = bucket(_mm512_mul_ps(odd, scale));
                let bytes = _mm512_cvtepi32_epi8(_mm512_or_si512(_mm512_slli_epi32::<4>(hi), lo));
                unsafe { _mm_storeu_si128(dst.as_mut_ptr().cast(), bytes) };
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn full_blocks_avx2<S: Source, C: Code>(
        input: &[u8],
        bs: usize,
        packed: &mut [u8],
        absmax: &mut [f32],
    ) {
        full_blocks_generic::<S, C>(input, bs, packed, absmax);
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    pub(super) unsafe fn int8_rows_avx512<S: Source>(
        input: &[u8],
        cols: usize,
        first_row: usize,
        tail_from: usize,
        out: &mut [i8],
        scb: &mut [f32],
    ) {
        int8_rows_generic::<S>(input, cols, first_row, tail_from, out, scb);
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn int8_rows_avx2<S: Source>(
        input: &[u8],
        cols: usize,
        first_row: usize,
        tail_from: usize,
        out: &mut [i8],
        scb: &mut [f32],
    ) {
        int8_rows_generic::<S>(input, cols, first_row, tail_from, out, scb);
    }
}

/// The NEON loops: the generic loops' arithmetic, lane by lane, with the loads,
/// conversions and the bucketize written out. LLVM vectorizes the generic loops for
/// NEON too; these execute fewer instructions (counted under qemu, `-singlestep -d
/// exec`, per value, generic → NEON: NF4 14.5 → 5.4 from BF16, 15.2 → 5.8 from F32,
/// 19.7 → 11.2 from F16; FP4 15.7 → 10.7 from BF16; int8 15.6 → 8.3 from BF16, 39.5 →
/// 12.3 from F32, 14.0 → 11.7 from F16). Not yet timed on Arm hardware.
///
/// * 4-bit: per batch of blocks (as [`full_blocks_generic`]), every block's absmax by
///   an unsigned max over `|x|` bit patterns (16-bit lanes for BF16 and F16, 32-bit for
///   F32; NaN and its first-NaN rule as the generic loop), the scales in scalar code,
///   then 32 values (16 packed bytes) at a time: the even and the odd elements as f32
///   vectors (BF16: a shift and a mask of each 32-bit pair, as the AVX-512 loop; F16:
///   [`f16_to_f32`] on integer lanes, not the `fcvtl` of the fp16 intrinsics, which
///   need Rust's unstable `f16`; F32: `uzp1`/`uzp2`), `x * scale` (`fmul`, the same
///   rounding), and bucketize: with [`Code::CELLS`] (NF4) a cell lookup and one compare
///   ([`bucket_cells`]), else 15 compares `bound >= v` whose all-ones results are summed
///   (`!(b >= v)` counts, NaN too); then through the code book's order by `tbl`.
/// * int8: per row, the largest `|x.half()|` bit pattern ([`round_to_f16`] or
///   [`f16_to_f32`] on integer lanes), the SCB and scale in scalar code ([`row_scb`]),
///   then `x.half() * scale` and [`to_i8_even`]'s magic-number rounding, narrowed by
///   truncation as `as i8` does; the last `cols % 16` columns go through the scalar code.
///
/// Float operations are IEEE `fmul`/`fadd`/`fcmge` in round-to-nearest with
/// subnormals kept (Linux's default FPCR, which Rust assumes), as the scalar code's.
#[cfg(target_arch = "aarch64")]
mod neon {
    use super::{
        clamp_min, first_nan, row_scb, to_i8_even, Code, Kind, Source, BATCH, BLOCKSIZES, QUIET,
    };
    use std::arch::aarch64::*;

    /// 16 bytes at `p`, no alignment needed.
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn load(p: *const u8) -> uint32x4_t {
        // SAFETY: the caller's: 16 readable bytes
        vreinterpretq_u32_u8(unsafe { vld1q_u8(p) })
    }

    /// [`super::f16_to_f32`] of the f16 in each lane's low 16 bits (the high ones zero),
    /// as f32 bits: the same integer operations, the same selection.
    #[inline]
    #[target_feature(enable = "neon")]
    fn f16_to_f32(h: uint32x4_t) -> uint32x4_t {
        let sign = vshlq_n_u32::<16>(vandq_u32(h, vdupq_n_u32(0x8000)));
        let magnitude = vandq_u32(h, vdupq_n_u32(0x7fff));
        let mantissa = vandq_u32(h, vdupq_n_u32(0x03ff));
        let normal = vaddq_u32(vshlq_n_u32::<13>(magnitude), vdupq_n_u32(0x3800_0000));
        // mantissa * 2^-24, exact in f32
        let subnormal = vreinterpretq_u32_f32(vmulq_f32(
            vcvtq_f32_u32(mantissa),
            vdupq_n_f32(1.0 / 16_777_216.0),
        ));
        let quiet = vandq_u32(vtstq_u32(h, vdupq_n_u32(0x03ff)), vdupq_n_u32(QUIET));
        let inf_nan = vorrq_u32(
            vorrq_u32(vdupq_n_u32(0x7f80_0000), vshlq_n_u32::<13>(mantissa)),
            quiet,
        );
        let is_inf_nan = vcgeq_u32(magnitude, vdupq_n_u32(0x7c00));
        let is_normal = vcgeq_u32(magnitude, vdupq_n_u32(0x0400));
        let bits = vbslq_u32(is_inf_nan, inf_nan, vbslq_u32(is_normal, normal, subnormal));
        vorrq_u32(sign, bits)
    }

    /// [`super::round_to_f16`] of f32 bits, lane by lane: the same integer operations,
    /// the same `(|x| + 0.5) - 0.5` below 2^-14, the same selection.
    #[inline]
    #[target_feature(enable = "neon")]
    fn round_to_f16(bits: uint32x4_t) -> uint32x4_t {
        let a = vandq_u32(bits, vdupq_n_u32(0x7fff_ffff));
        let odd = vandq_u32(vshrq_n_u32::<13>(a), vdupq_n_u32(1));
        let normal = vandq_u32(
            vaddq_u32(vaddq_u32(a, vdupq_n_u32(0x0fff)), odd),
            vdupq_n_u32(0xffff_e000),
        );
        let half = vdupq_n_f32(0.5);
        let subnormal =
            vreinterpretq_u32_f32(vsubq_f32(vaddq_f32(vreinterpretq_f32_u32(a), half), half));
        let r = vbslq_u32(
            vcgtq_u32(a, vdupq_n_u32(0x7f80_0000)),
            a,
            vbslq_u32(
                vcgeq_u32(a, vdupq_n_u32(0x477f_f000)),
                vdupq_n_u32(0x7f80_0000),
                vbslq_u32(vcgeq_u32(a, vdupq_n_u32(0x3880_0000)), normal, subnormal),
            ),
        );
        vorrq_u32(vandq_u32(bits, vdupq_n_u32(0x8000_0000)), r)
    }

    /// The largest key ([`Source::key`]) of a block of a multiple of 32 elements.
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn block_key<S: Source>(block: &[u8]) -> u32 {
        if S::KIND == Kind::F32 {
            let magnitude = vdupq_n_u32(0x7fff_ffff);
            let mut m = [vdupq_n_u32(0); 2];
            for chunk in block.chunks_exact(32) {
                for (k, m) in m.iter_mut().enumerate() {
                    // SAFETY: 32 readable bytes
                    let w = unsafe { load(chunk.as_ptr().add(16 * k)) };
                    *m = vmaxq_u32(*m, vandq_u32(w, magnitude));
                }
            }
            vmaxvq_u32(vmaxq_u32(m[0], m[1]))
        } else {
            let magnitude = vdupq_n_u16(0x7fff);
            let mut m = [vdupq_n_u16(0); 2];
            for chunk in block.chunks_exact(32) {
                for (k, m) in m.iter_mut().enumerate() {
                    // SAFETY: 32 readable bytes
                    let w = vreinterpretq_u16_u32(unsafe { load(chunk.as_ptr().add(16 * k)) });
                    *m = vmaxq_u16(*m, vandq_u16(w, magnitude));
                }
            }
            u32::from(vmaxvq_u16(vmaxq_u16(m[0], m[1])))
        }
    }

    /// 32 consecutive elements at `p` as f32 vectors: the even ones (0, 2, .., 30)
    /// and the odd ones (1, 3, .., 31), each in order. Exact ([`Source::load`]).
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn pairs<S: Source>(p: *const u8) -> ([float32x4_t; 4], [float32x4_t; 4]) {
        let mut even = [vdupq_n_f32(0.0); 4];
        let mut odd = [vdupq_n_f32(0.0); 4];
        for k in 0..4 {
            match S::KIND {
                Kind::Bf16 | Kind::F16 => {
                    // SAFETY: the caller's: 64 readable bytes at p
                    let w = unsafe { load(p.add(16 * k)) };
                    let (e, o) = if S::KIND == Kind::Bf16 {
                        (vshlq_n_u32::<16>(w), vandq_u32(w, vdupq_n_u32(0xffff_0000)))
                    } else {
                        (
                            f16_to_f32(vandq_u32(w, vdupq_n_u32(0xffff))),
                            f16_to_f32(vshrq_n_u32::<16>(w)),
                        )
                    };
                    even[k] = vreinterpretq_f32_u32(e);
                    odd[k] = vreinterpretq_f32_u32(o);
                }
                Kind::F32 => {
                    // SAFETY: the caller's: 128 readable bytes at p
                    let (a, b) = unsafe { (load(p.add(32 * k)), load(p.add(32 * k + 16))) };
                    even[k] = vreinterpretq_f32_u32(vuzp1q_u32(a, b));
                    odd[k] = vreinterpretq_f32_u32(vuzp2q_u32(a, b));
                }
            }
        }
        (even, odd)
    }

    /// bucketize(v, BOUNDS) per lane: 15 minus the number of bounds with `b >= v`
    /// (`fcmge`, false for NaN, which lands in the last bucket).
    #[inline]
    #[target_feature(enable = "neon")]
    fn bucket<C: Code>(v: float32x4_t, bounds: &[float32x4_t; 15]) -> uint32x4_t {
        let mut i = vdupq_n_u32(15);
        for b in bounds {
            // all ones (-1) where b >= v
            i = vaddq_u32(i, vcgeq_f32(*b, v));
        }
        i
    }

    /// The tables [`bucket_cells`] looks up: per cell, its count of midpoints below it
    /// plus one (bytes), and the midpoints (the bytes of 16 f32, the last `inf`).
    #[inline]
    #[target_feature(enable = "neon")]
    fn cell_tables<C: Code>(cells: [i32; 32]) -> (uint8x16x2_t, uint8x16x4_t) {
        let cells = cells.map(|c| c as u8 + 1);
        let mut bounds = [f32::INFINITY; 16];
        bounds[..15].copy_from_slice(&C::BOUNDS);
        let mut bytes = [0u8; 64];
        for (b, v) in bytes.chunks_exact_mut(4).zip(bounds) {
            b.copy_from_slice(&v.to_le_bytes());
        }
        // SAFETY: 32 and 64 readable bytes
        unsafe { (vld1q_u8_x2(cells.as_ptr()), vld1q_u8_x4(bytes.as_ptr())) }
    }

    /// bucketize with [`Code::CELLS`], as the x86 `bucket_cells`: the cell of `v`,
    /// `fma(v, 16, 16)` clamped to `[0, 31]` (`fminnm`/`fmaxnm` return the number where
    /// the other operand is a quiet NaN, so NaN goes to 31; `v` is a product, never a
    /// signalling NaN) and truncated; `tbl` looks up the cell's count of midpoints below
    /// it plus one, and the midpoint at that count (its four bytes); `b >= v` (all ones)
    /// takes the one back. Ten instructions for four values, against thirty for the
    /// fifteen compares of [`bucket`].
    #[inline]
    #[target_feature(enable = "neon")]
    fn bucket_cells(v: float32x4_t, cells: uint8x16x2_t, bounds: uint8x16x4_t) -> uint32x4_t {
        let t = vfmaq_f32(vdupq_n_f32(16.0), v, vdupq_n_f32(16.0));
        let t = vmaxnmq_f32(vminnmq_f32(t, vdupq_n_f32(31.0)), vdupq_n_f32(0.0));
        // the cell in each lane's low byte, the other bytes out of range (`tbl` gives 0)
        let cell = vorrq_u32(vcvtq_u32_f32(t), vdupq_n_u32(0xffff_ff00));
        let above = vreinterpretq_u32_u8(vqtbl2q_u8(cells, vreinterpretq_u8_u32(cell)));
        // bytes 4 (above - 1) + 0, 1, 2, 3: no carries, above is 1..=15
        let at = vmlaq_u32(
            vdupq_n_u32(0x0302_0100u32.wrapping_sub(0x0404_0404)),
            above,
            vdupq_n_u32(0x0404_0404),
        );
        let bound = vreinterpretq_f32_u8(vqtbl4q_u8(bounds, vreinterpretq_u8_u32(at)));
        vaddq_u32(above, vcgeq_f32(bound, v))
    }

    /// [`bucket_cells`] of each value, for tests: `values.len()` a multiple of 4.
    #[cfg(test)]
    pub(super) fn buckets_by_cells<C: Code>(values: &[f32]) -> Vec<u32> {
        let mut out = vec![0u32; values.len()];
        // SAFETY: NEON is in the aarch64 baseline; 4-element chunks
        unsafe {
            let (cells, bounds) = cell_tables::<C>(C::CELLS.expect("a code book with cells"));
            for (v, o) in values.chunks_exact(4).zip(out.chunks_exact_mut(4)) {
                let b = bucket_cells(vld1q_f32(v.as_ptr()), cells, bounds);
                vst1q_u32(o.as_mut_ptr(), b);
            }
        }
        out
    }

    /// Four vectors of small integers as 16 bytes, in order.
    #[inline]
    #[target_feature(enable = "neon")]
    fn narrow(v: [uint32x4_t; 4]) -> uint8x16_t {
        let lo = vcombine_u16(vmovn_u32(v[0]), vmovn_u32(v[1]));
        let hi = vcombine_u16(vmovn_u32(v[2]), vmovn_u32(v[3]));
        vcombine_u8(vmovn_u16(lo), vmovn_u16(hi))
    }

    /// 4-bit full blocks with NEON; `input` holds `absmax.len()` whole blocks of `bs`.
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn full_blocks_neon<S: Source, C: Code>(
        input: &[u8],
        bs: usize,
        packed: &mut [u8],
        absmax: &mut [f32],
    ) {
        debug_assert!(bs.is_multiple_of(32));
        let per_batch = (BATCH / bs).max(1);
        let batches = input
            .chunks(per_batch * bs * S::BYTES)
            .zip(packed.chunks_mut(per_batch * bs / 2))
            .zip(absmax.chunks_mut(per_batch));
        let bounds = C::BOUNDS.map(|b| vdupq_n_f32(b));
        // SAFETY: 16 readable bytes
        let order = unsafe { vld1q_u8(C::ORDER.as_ptr()) };
        let tables = C::CELLS.map(|cells| cell_tables::<C>(cells));
        let mut scales = [0f32; BATCH / BLOCKSIZES[0]];
        for ((input, packed), absmax) in batches {
            for (block, am) in input.chunks_exact(bs * S::BYTES).zip(absmax.iter_mut()) {
                // SAFETY: whole blocks, a multiple of 32 elements
                let key = unsafe { block_key::<S>(block) };
                *am = if key > S::INF_KEY {
                    first_nan::<S>(block)
                } else {
                    S::key_value(key)
                };
            }
            for (scale, &am) in scales.iter_mut().zip(absmax.iter()) {
                // torch: `1.0 / t` is `t.reciprocal() * 1.0`
                *scale = 1.0 / clamp_min(am);
            }
            let blocks = input
                .chunks_exact(bs * S::BYTES)
                .zip(packed.chunks_exact_mut(bs / 2))
                .zip(scales);
            for ((block, out), scale) in blocks {
                let scale = vdupq_n_f32(scale);
                let chunks = block
                    .chunks_exact(32 * S::BYTES)
                    .zip(out.chunks_exact_mut(16));
                for (chunk, dst) in chunks {
                    // SAFETY: 32 elements
                    let (even, odd) = unsafe { pairs::<S>(chunk.as_ptr()) };
                    let q = |v: [float32x4_t; 4]| {
                        let b = narrow(v.map(|v| {
                            let v = vmulq_f32(v, scale);
                            match tables {
                                Some((cells, midpoints)) => bucket_cells(v, cells, midpoints),
                                None => bucket::<C>(v, &bounds),
                            }
                        }));
                        if C::SORTED {
                            b
                        } else {
                            vqtbl1q_u8(order, b)
                        }
                    };
                    let bytes = vorrq_u8(vshlq_n_u8::<4>(q(even)), q(odd));
                    // SAFETY: 16 writable bytes
                    unsafe { vst1q_u8(dst.as_mut_ptr(), bytes) };
                }
            }
        }
    }

    /// 16 consecutive elements at `p`, [`Source::half`] of each as f32 bits, in order.
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn halves<S: Source>(p: *const u8) -> [uint32x4_t; 4] {
        let mut out = [vdupq_n_u32(0); 4];
        match S::KIND {
            Kind::Bf16 | Kind::F16 => {
                for k in 0..2 {
                    // SAFETY: the caller's: 32 readable bytes at p
                    let w = vreinterpretq_u16_u32(unsafe { load(p.add(16 * k)) });
                    let (a, b) = if S::KIND == Kind::Bf16 {
                        (
                            round_to_f16(vshll_n_u16::<16>(vget_low_u16(w))),
                            round_to_f16(vshll_high_n_u16::<16>(w)),
                        )
                    } else {
                        (
                            f16_to_f32(vmovl_u16(vget_low_u16(w))),
                            f16_to_f32(vmovl_high_u16(w)),
                        )
                    };
                    out[2 * k] = a;
                    out[2 * k + 1] = b;
                }
            }
            Kind::F32 => {
                for (k, o) in out.iter_mut().enumerate() {
                    // SAFETY: the caller's: 64 readable bytes at p
                    *o = round_to_f16(unsafe { load(p.add(16 * k)) });
                }
            }
        }
        out
    }

    /// [`to_i8_even`] of `y * scale` per lane, as 32-bit lanes whose low byte is the int8.
    #[inline]
    #[target_feature(enable = "neon")]
    fn to_i8_even_lanes(h: uint32x4_t, scale: float32x4_t) -> uint32x4_t {
        const MAGIC: f32 = 12_582_912.0;
        let y = vmulq_f32(vreinterpretq_f32_u32(h), scale);
        // NaN → +0.0
        let y = vandq_u32(vreinterpretq_u32_f32(y), vceqq_f32(y, y));
        let sum = vaddq_f32(vreinterpretq_f32_u32(y), vdupq_n_f32(MAGIC));
        vsubq_u32(vreinterpretq_u32_f32(sum), vdupq_n_u32(MAGIC.to_bits()))
    }

    /// [`f16_to_f32`] and [`round_to_f16`] of four lanes, for tests.
    #[cfg(test)]
    pub(super) fn conversions(lanes: [u32; 4]) -> ([u32; 4], [u32; 4]) {
        let (mut a, mut b) = ([0u32; 4], [0u32; 4]);
        // SAFETY: NEON is in the aarch64 baseline; 16-byte arrays
        unsafe {
            let v = vld1q_u32(lanes.as_ptr());
            vst1q_u32(
                a.as_mut_ptr(),
                f16_to_f32(vandq_u32(v, vdupq_n_u32(0xffff))),
            );
            vst1q_u32(b.as_mut_ptr(), round_to_f16(v));
        }
        (a, b)
    }

    /// Int8 rows with NEON; the arguments as [`super::int8_rows_generic`]'s.
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn int8_rows_neon<S: Source>(
        input: &[u8],
        cols: usize,
        first_row: usize,
        tail_from: usize,
        out: &mut [i8],
        scb: &mut [f32],
    ) {
        let body = cols - cols % 16;
        let rows = input
            .chunks_exact(cols * S::BYTES)
            .zip(out.chunks_exact_mut(cols))
            .zip(scb.iter_mut());
        for (r, ((row, out), stat)) in rows.enumerate() {
            let (row_body, row_tail) = row.split_at(body * S::BYTES);
            let magnitude = vdupq_n_u32(0x7fff_ffff);
            let mut m = vdupq_n_u32(0);
            for chunk in row_body.chunks_exact(16 * S::BYTES) {
                // SAFETY: 16 elements
                for h in unsafe { halves::<S>(chunk.as_ptr()) } {
                    m = vmaxq_u32(m, vandq_u32(h, magnitude));
                }
            }
            let key = row_tail
                .chunks_exact(S::BYTES)
                .map(|e| S::half(e).to_bits() & 0x7fff_ffff)
                .fold(vmaxvq_u32(m), u32::max);
            let scale = row_scb::<S>(row, key, first_row + r < tail_from, stat);
            let (out_body, out_tail) = out.split_at_mut(body);
            let lanes = vdupq_n_f32(scale);
            let chunks = row_body
                .chunks_exact(16 * S::BYTES)
                .zip(out_body.chunks_exact_mut(16));
            for (chunk, dst) in chunks {
                // SAFETY: 16 elements
                let q = unsafe { halves::<S>(chunk.as_ptr()) }.map(|h| to_i8_even_lanes(h, lanes));
                // truncating narrows: the low byte, as `as i8`
                // SAFETY: 16 writable bytes
                unsafe { vst1q_u8(dst.as_mut_ptr().cast(), narrow(q)) };
            }
            for (q, e) in out_tail.iter_mut().zip(row_tail.chunks_exact(S::BYTES)) {
                *q = to_i8_even(S::half(e) * scale);
            }
        }
    }
}

/// `input` holds `absmax.len()` whole blocks of `bs` elements.
#[inline(always)]
fn full_blocks_generic<S: Source, C: Code>(
    input: &[u8],
    bs: usize,
    packed: &mut [u8],
    absmax: &mut [f32],
) {
    // Blocks go in batches of about BATCH elements: first every block's absmax
    // (independent reductions the CPU overlaps), then their scales (one vector
    // division), then the packing, all while the batch is in L1.
    let per_batch = (BATCH / bs).max(1);
    let batches = input
        .chunks(per_batch * bs * S::BYTES)
        .zip(packed.chunks_mut(per_batch * bs / 2))
        .zip(absmax.chunks_mut(per_batch));
    let mut scales = [0f32; BATCH / BLOCKSIZES[0]];
    let mut pair_scales = if bs > BLOCKSIZES[0] {
        Vec::new()
    } else {
        vec![0f32; per_batch * bs / 2]
    };
    for ((input, packed), absmax) in batches {
        for (block, am) in input.chunks_exact(bs * S::BYTES).zip(absmax.iter_mut()) {
            let key = block.chunks_exact(S::BYTES).map(S::key).fold(0, u32::max);
            *am = if key > S::INF_KEY {
                first_nan::<S>(block)
            } else {
                S::key_value(key)
            };
        }
        for (scale, &am) in scales.iter_mut().zip(absmax.iter()) {
            // torch: `1.0 / t` is `t.reciprocal() * 1.0`
            *scale = 1.0 / clamp_min(am);
        }
        if bs > BLOCKSIZES[0] {
            let blocks = input
                .chunks_exact(bs * S::BYTES)
                .zip(packed.chunks_exact_mut(bs / 2))
                .zip(scales);
            for ((block, out), scale) in blocks {
                for (o, pair) in out.iter_mut().zip(block.chunks_exact(2 * S::BYTES)) {
                    *o = pack::<S, C>(pair, scale);
                }
            }
        } else {
            // 16 pairs are too few for a vectorized loop per block: one loop over
            // the batch, with each pair's scale spelled out
            for (span, &scale) in pair_scales.chunks_exact_mut(bs / 2).zip(scales.iter()) {
                span.fill(scale);
            }
            let pairs = input.chunks_exact(2 * S::BYTES).zip(pair_scales.iter());
            for (o, (pair, &scale)) in packed.iter_mut().zip(pairs) {
                *o = pack::<S, C>(pair, scale);
            }
        }
    }
}

/// One packed byte: two elements, scaled and bucketized.
#[inline(always)]
fn pack<S: Source, C: Code>(pair: &[u8], scale: f32) -> u8 {
    let (a, b) = S::load_pair(pair);
    // clamp(-1, 1) is left out: every bound is inside (-1, 1), so it never
    // changes the bucket (and NaN stays NaN either way)
    (index::<C>(a * scale) << 4 | index::<C>(b * scale)) as u8
}

/// `max(dim=-1)` returns a row's first NaN, as it is.
#[cold]
fn first_nan<S: Source>(block: &[u8]) -> f32 {
    block
        .chunks_exact(S::BYTES)
        .find(|e| S::key(e) > S::INF_KEY)
        .map_or(f32::NAN, S::nan_abs)
}

/// The last, partial block: absmax clamped, values divided (not multiplied).
fn partial_block<S: Source, C: Code>(input: &[u8], packed: &mut [u8], am: &mut f32) {
    let n = input.len() / S::BYTES;
    let key = input.chunks_exact(S::BYTES).map(S::key).fold(0, u32::max);
    let m = if key <= S::INF_KEY {
        clamp_min(S::key_value(key))
    } else if n == 1 {
        S::lone_nan_abs(input)
    } else {
        // the NaN torch's vectorized full reduction `max()` produces
        f32::from_bits(0xffff_ffff)
    };
    *am = m;
    let q = |i: usize| -> u32 {
        if i < n {
            index::<C>(S::load(&input[i * S::BYTES..]) / m)
        } else {
            index::<C>(0.0) // the padding of an odd element count
        }
    };
    for (j, o) in packed.iter_mut().enumerate() {
        *o = (q(2 * j) << 4 | q(2 * j + 1)) as u8;
    }
}

// --- int8 -------------------------------------------------------------------------

fn run_int8<S: Source>(input: &[u8], cols: usize, out: &mut [i8], scb: &mut [f32], threads: usize) {
    let rows = scb.len();
    // torch converts SCB from f16 to f32 eight at a time; the last rows % 8 go
    // through its scalar path, which turns NaN into 0x7FFF_FFFF
    let tail_from = rows - rows % 8;
    let threads = thread_count(threads, out.len(), rows);
    if threads <= 1 {
        int8_rows::<S>(input, cols, 0, tail_from, out, scb);
        return;
    }
    let per = rows.div_ceil(threads);
    thread::scope(|s| {
        let mut work = input
            .chunks(per * cols * S::BYTES)
            .zip(out.chunks_mut(per * cols))
            .zip(scb.chunks_mut(per))
            .enumerate();
        let first = work.next();
        for (k, ((i, o), r)) in work {
            s.spawn(move || int8_rows::<S>(i, cols, k * per, tail_from, o, r));
        }
        if let Some((_, ((i, o), r))) = first {
            int8_rows::<S>(i, cols, 0, tail_from, o, r);
        }
    });
}

fn int8_rows<S: Source>(
    input: &[u8],
    cols: usize,
    first_row: usize,
    tail_from: usize,
    out: &mut [i8],
    scb: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
        {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe {
                x86::int8_rows_avx512::<S>(input, cols, first_row, tail_from, out, scb)
            };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe {
                x86::int8_rows_avx2::<S>(input, cols, first_row, tail_from, out, scb)
            };
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon")
            && !FORCE_GENERIC_PACKING.load(std::sync::atomic::Ordering::Relaxed)
        {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe {
                neon::int8_rows_neon::<S>(input, cols, first_row, tail_from, out, scb)
            };
        }
    }
    int8_rows_generic::<S>(input, cols, first_row, tail_from, out, scb);
}

/// `round_half_even(y).to(int8)` for |y| < 2^22, and NaN → 0 (torch's cast on
/// x86-64 and Arm): adding 1.5 * 2^23 leaves no fraction bits, so the FPU's
/// default rounding rounds, and the integer is the low bits of the sum.
#[inline(always)]
fn to_i8_even(y: f32) -> i8 {
    const MAGIC: f32 = 12_582_912.0;
    let y = if y.is_nan() { 0.0 } else { y };
    (y + MAGIC).to_bits().wrapping_sub(MAGIC.to_bits()) as i8
}

#[inline(always)]
fn int8_rows_generic<S: Source>(
    input: &[u8],
    cols: usize,
    first_row: usize,
    tail_from: usize,
    out: &mut [i8],
    scb: &mut [f32],
) {
    let rows = input
        .chunks_exact(cols * S::BYTES)
        .zip(out.chunks_exact_mut(cols))
        .zip(scb.iter_mut());
    for (r, ((row, out), stat)) in rows.enumerate() {
        let key = row
            .chunks_exact(S::BYTES)
            .map(|e| S::half(e).to_bits() & 0x7fff_ffff)
            .fold(0, u32::max);
        let scale = row_scb::<S>(row, key, first_row + r < tail_from, stat);
        for (q, e) in out.iter_mut().zip(row.chunks_exact(S::BYTES)) {
            *q = to_i8_even(S::half(e) * scale);
        }
    }
}

/// A row's SCB into `stat` from `key`, the largest `|x.half()|` bit pattern of the
/// row (NaN above inf), and the row's scale `127 / SCB` as torch computes it.
/// `vector_row`: the row is not in the last `rows % 8` (see [`run_int8`]).
#[inline(always)]
fn row_scb<S: Source>(row: &[u8], key: u32, vector_row: bool, stat: &mut f32) -> f32 {
    let s = if key <= 0x7f80_0000 {
        f32::from_bits(key)
    } else if vector_row {
        let first = row
            .chunks_exact(S::BYTES)
            .map(S::to_f16)
            .find(|&h| h & 0x7fff > 0x7c00);
        f32::from_bits(f16_to_f32(first.unwrap_or(0x7e00)).to_bits() & 0x7fff_ffff)
    } else {
        f32::from_bits(0x7fff_ffff)
    };
    *stat = s;
    // torch: `127.0 / t` is `t.reciprocal() * 127.0`; `A * scale` is f32
    (1.0 / s) * 127.0
}

#[cfg(test)]
#[allow(clippy::neg_cmp_op_on_partial_ord)] // `!(b >= v)` is bucketize's NaN rule
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bf16_bytes(values: &[f32]) -> Vec<u8> {
        values
            .iter()
            .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
            .collect()
    }

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    fn q4(input: &[u8], dtype: Dtype, qt: QuantType, bs: usize) -> (Vec<u8>, Vec<u32>) {
        let n = input.len() / (dtype.bits() as usize / 8);
        let mut packed = vec![0xaa; packed_len(n)];
        let mut absmax = vec![-1.0; blocks(n, bs)];
        quantize_4bit(input, dtype, qt, bs, &mut packed, &mut absmax, 1).unwrap();
        (packed, absmax.iter().map(|a| a.to_bits()).collect())
    }

    /// A slow, obvious transcription of bitsandbytes' torch code, for comparison.
    fn reference(values: &[f32], qt: QuantType, bs: usize) -> (Vec<u8>, Vec<f32>) {
        let (bounds, order) = (qt.bounds(), qt.order());
        let bucket = |v: f32| order[bounds.iter().take_while(|&&b| !(b >= v)).count()];
        let mut q = Vec::new();
        let mut absmax = Vec::new();
        for block in values.chunks(bs) {
            let m = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let c = m.max(1e-38);
            if block.len() == bs {
                absmax.push(m);
                q.extend(block.iter().map(|&v| bucket(v * (1.0 / c))));
            } else {
                absmax.push(c);
                q.extend(block.iter().map(|&v| bucket(v / c)));
            }
        }
        if q.len() % 2 == 1 {
            q.push(bucket(0.0));
        }
        let packed = q.chunks(2).map(|p| p[0] << 4 | p[1]).collect();
        (packed, absmax)
    }

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0
    }

    #[test]
    fn bounds_are_the_midpoints_of_the_sorted_code() {
        for qt in [QuantType::Nf4, QuantType::Fp4] {
            let (code, order, bounds) = (qt.code(), qt.order(), qt.bounds());
            for i in 0..15 {
                let mid = (code[order[i] as usize] + code[order[i + 1] as usize]) / 2.0;
                assert_eq!(bounds[i].to_bits(), mid.to_bits(), "{qt} bound {i}");
                assert!(code[order[i] as usize] <= code[order[i + 1] as usize]);
            }
        }
    }

    #[test]
    fn bounds_match_bitsandbytes_bit_patterns() {
        // printed from bitsandbytes 0.50 `_get_4bit_quantize_bounds(...).view(torch.int32)`
        let nf4: [u32; 15] = [
            0xbf59_1cd8,
            0xbf1c_5270,
            0xbeeb_8480,
            0xbead_ea76,
            0xbe70_3cec,
            0xbe0d_38bc,
            0xbd3a_7871,
            0x3d22_faff,
            0x3df6_4862,
            0x3e50_67e0,
            0x3e95_82d4,
            0x3ec7_53f9,
            0x3f00_6d04,
            0x3f24_8daf,
            0x3f5c_89da,
        ];
        let fp4: [u32; 15] = [
            0xbf55_5556,
            0xbf15_5556,
            0xbed5_5556,
            0xbe95_5556,
            0xbe55_5556,
            0xbdb0_0000,
            0xbb2a_aaab,
            0x0,
            0x3b2a_aaab,
            0x3db0_0000,
            0x3e55_5556,
            0x3e95_5556,
            0x3ed5_5556,
            0x3f15_5556,
            0x3f55_5556,
        ];
        let bits = |qt: QuantType| qt.bounds().map(f32::to_bits);
        assert_eq!(bits(QuantType::Nf4), nf4);
        assert_eq!(bits(QuantType::Fp4), fp4);
    }

    #[test]
    fn index_is_order_of_bucketize() {
        for v in [
            -2.0,
            -1.0,
            -0.5,
            -0.0,
            0.0,
            1e-3,
            0.1,
            0.5,
            1.0,
            3.0,
            f32::NAN,
        ] {
            for qt in [QuantType::Nf4, QuantType::Fp4] {
                let slow = qt.order()[qt.bounds().iter().filter(|&&b| !(b >= v)).count()];
                let fast = match qt {
                    QuantType::Nf4 => index::<Nf4>(v),
                    QuantType::Fp4 => index::<Fp4>(v),
                };
                assert_eq!(fast, u32::from(slow), "{qt} {v}");
            }
        }
        assert_eq!(index::<Nf4>(f32::NAN), 15);
        assert_eq!(index::<Fp4>(f32::NAN), 3);
        assert_eq!(index::<Nf4>(0.0), 7);
        assert_eq!(index::<Fp4>(0.0), 0);
    }

    #[test]
    fn matches_the_reference_on_random_data() {
        let mut seed = 7;
        for &bs in &BLOCKSIZES {
            for n in [0, 1, 2, 3, bs - 1, bs, bs + 1, 3 * bs + 17, 5 * bs] {
                let values: Vec<f32> = (0..n).map(|_| lcg(&mut seed)).collect();
                for qt in [QuantType::Nf4, QuantType::Fp4] {
                    let (packed, absmax) = reference(&values, qt, bs);
                    let absmax: Vec<u32> = absmax.iter().map(|a| a.to_bits()).collect();
                    let got = q4(&f32_bytes(&values), Dtype::F32, qt, bs);
                    assert_eq!(got, (packed, absmax), "{qt} n={n} bs={bs}");
                }
            }
        }
    }

    #[test]
    fn bf16_matches_the_reference_and_the_generic_loop() {
        // BF16 takes the AVX-512 packing loop where the CPU has it: the reference (the
        // values are exact in bf16), and the generic loop, bit for bit, NaN and inf too
        let mut seed = 11;
        let specials = [
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            1e-40,
            -3e-39,
        ];
        for &bs in &BLOCKSIZES {
            for n in [bs, 2 * bs + 5, 7 * bs] {
                let mut values: Vec<f32> = (0..n)
                    .map(|_| f32::from_bits(lcg(&mut seed).to_bits() & 0xffff_0000))
                    .collect();
                let clean = values.clone();
                for (i, v) in values.iter_mut().enumerate().skip(3).step_by(97) {
                    *v = specials[i % specials.len()];
                }
                let bytes = bf16_bytes(&values);
                for qt in [QuantType::Nf4, QuantType::Fp4] {
                    let (packed, absmax) = reference(&clean, qt, bs);
                    let absmax: Vec<u32> = absmax.iter().map(|a| a.to_bits()).collect();
                    let got = q4(&bf16_bytes(&clean), Dtype::BF16, qt, bs);
                    assert_eq!(got, (packed, absmax), "{qt} n={n} bs={bs}");
                    let fast = q4(&bytes, Dtype::BF16, qt, bs);
                    FORCE_GENERIC_PACKING.store(true, std::sync::atomic::Ordering::Relaxed);
                    let generic = q4(&bytes, Dtype::BF16, qt, bs);
                    FORCE_GENERIC_PACKING.store(false, std::sync::atomic::Ordering::Relaxed);
                    assert_eq!(fast, generic, "{qt} n={n} bs={bs} with specials");
                }
            }
        }
    }

    #[test]
    fn nf4_has_cells_and_fp4_does_not() {
        assert!(Nf4::CELLS.is_some() && Nf4::SORTED);
        // three midpoints within 0.006 of zero
        assert!(Fp4::CELLS.is_none() && !Fp4::SORTED);
    }

    /// Every f32 within `radius` ulps of each NF4 midpoint and each cell edge, both signs
    /// of zero, NaNs, infinities, values beyond [-1, 1], and `sweep` points of [-1.1, 1.1].
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    fn cell_test_values(radius: i32, sweep: usize) -> Vec<f32> {
        let mut values = vec![
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7fc1_2345),
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            1e-38,
            -1e-45,
            1.0,
            -1.0,
            2.0,
            -2.0,
            f32::MAX,
            f32::MIN,
        ];
        let edges = (0..=32).map(|c| c as f32 / 16.0 - 1.0);
        for centre in Nf4::BOUNDS.into_iter().chain(edges).chain([-0.0]) {
            for d in -radius..=radius {
                let bits = centre.to_bits() as i64 + i64::from(d);
                // around 0.0 the bit patterns step into the negatives' side: both kept
                values.push(f32::from_bits(bits as u32));
            }
        }
        let step = 2.2 / sweep as f32;
        values.extend((0..sweep).map(|i| i as f32 * step - 1.1));
        values.resize(values.len().next_multiple_of(16), 0.5);
        values
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn bucketize_by_cells_is_bucketize() {
        // every f32 within 2^16 ulps of each midpoint and each cell edge, both signs of
        // zero, NaNs, infinities, values beyond [-1, 1], and a sweep of [-1.1, 1.1]
        if !(std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw"))
        {
            eprintln!("skipped: no AVX-512 on this CPU");
            return;
        }
        let values = cell_test_values(1 << 16, 2_200_000);
        // SAFETY: the CPU has AVX-512 (checked above)
        let got = unsafe { x86::buckets_by_cells::<Nf4>(&values) };
        for (v, g) in values.iter().zip(got) {
            assert_eq!(g, index::<Nf4>(*v), "v = {v:e} ({:#x})", v.to_bits());
        }
    }

    #[cfg(target_arch = "aarch64")]
    #[test]
    fn neon_bucketize_by_cells_is_bucketize() {
        // as the x86 test, fewer values (qemu): 2^12 ulps around each edge
        let values = cell_test_values(1 << 12, 220_000);
        let got = neon::buckets_by_cells::<Nf4>(&values);
        for (v, g) in values.iter().zip(got) {
            assert_eq!(g, index::<Nf4>(*v), "v = {v:e} ({:#x})", v.to_bits());
        }
    }

    #[test]
    fn thread_count_does_not_change_the_result() {
        let mut seed = 1;
        let n = 3 * MIN_PER_THREAD + 77;
        let values: Vec<f32> = (0..n).map(|_| lcg(&mut seed)).collect();
        let input = bf16_bytes(&values);
        let one = q4(&input, Dtype::BF16, QuantType::Nf4, 64);
        for threads in [2, 3, 8] {
            let mut packed = vec![0; packed_len(n)];
            let mut absmax = vec![0.0; blocks(n, 64)];
            quantize_4bit(
                &input,
                Dtype::BF16,
                QuantType::Nf4,
                64,
                &mut packed,
                &mut absmax,
                threads,
            )
            .unwrap();
            assert_eq!(packed, one.0);
            assert_eq!(
                absmax.iter().map(|a| a.to_bits()).collect::<Vec<_>>(),
                one.1
            );
        }
    }

    #[test]
    fn special_values() {
        // all zeros: absmax 0 (full block) but clamped 1e-38 for the partial one
        let (packed, absmax) = q4(&f32_bytes(&[0.0; 35]), Dtype::F32, QuantType::Nf4, 32);
        assert!(packed.iter().all(|&b| b == 0x77));
        assert_eq!(absmax, [0, 1e-38f32.to_bits()]);
        // a NaN in a full block: its absmax is that NaN without sign, all nibbles 15
        let mut values = vec![1.0f32; 32];
        values[3] = f32::from_bits(0xffc1_2345);
        values[9] = f32::from_bits(0x7fc0_0042);
        let (packed, absmax) = q4(&f32_bytes(&values), Dtype::F32, QuantType::Nf4, 32);
        assert!(packed.iter().all(|&b| b == 0xff));
        assert_eq!(absmax, [0x7fc1_2345]);
        // NaN in a partial block of several elements: torch's all-ones NaN
        let (packed, absmax) = q4(&f32_bytes(&values[..5]), Dtype::F32, QuantType::Fp4, 32);
        assert_eq!(absmax, [0xffff_ffff]);
        assert_eq!(packed, [0x33, 0x33, 0x30]); // fp4 index of NaN is 3, padding 0
                                                // a lone NaN is quieted
        let (_, absmax) = q4(
            &f32_bytes(&[f32::from_bits(0xff80_0001)]),
            Dtype::F32,
            QuantType::Nf4,
            64,
        );
        assert_eq!(absmax, [0x7fc0_0001]);
        // inf: scale 0, so finite values go to the zero code and inf to NaN's
        let mut values = vec![1.0f32; 32];
        values[0] = f32::INFINITY;
        let (packed, absmax) = q4(&f32_bytes(&values), Dtype::F32, QuantType::Nf4, 32);
        assert_eq!(absmax, [f32::INFINITY.to_bits()]);
        assert_eq!(packed[0], 0xf7);
        assert!(packed[1..].iter().all(|&b| b == 0x77));
    }

    #[test]
    fn rejects_bad_arguments() {
        let mut packed = [0u8; 2];
        let mut absmax = [0f32; 1];
        let input = [0u8; 8];
        let err = |dtype, bs, packed: &mut [u8], absmax: &mut [f32]| {
            quantize_4bit(&input, dtype, QuantType::Nf4, bs, packed, absmax, 1).unwrap_err()
        };
        assert_eq!(
            err(Dtype::F64, 64, &mut packed, &mut absmax),
            QuantError::Dtype(Dtype::F64)
        );
        assert_eq!(
            err(Dtype::BF16, 48, &mut packed, &mut absmax),
            QuantError::Blocksize(48)
        );
        assert!(matches!(
            err(Dtype::BF16, 64, &mut [0u8; 3], &mut absmax),
            QuantError::OutputLen {
                expected: 2,
                got: 3,
                ..
            }
        ));
        let e = quantize_4bit(
            &input[..3],
            Dtype::BF16,
            QuantType::Nf4,
            64,
            &mut packed,
            &mut absmax,
            1,
        );
        assert!(matches!(e, Err(QuantError::InputBytes { bytes: 3, .. })));
        let e = quantize_int8(&input, Dtype::BF16, 3, &mut [0; 4], &mut [0.0; 1], 1);
        assert_eq!(
            e,
            Err(QuantError::Rows {
                elements: 4,
                cols: 3
            })
        );
        assert!(e.unwrap_err().to_string().contains("3 columns"));
    }

    #[test]
    fn f16_conversions_round_trip_and_round_to_even() {
        for h in 0..=u16::MAX {
            let f = f16_to_f32(h);
            let back = f32_to_f16(f);
            if f.is_nan() {
                assert!(f.to_bits() & QUIET != 0);
                assert_eq!(back, h | 0x0200, "{h:#x}");
            } else {
                assert_eq!(back, h, "{h:#x}");
            }
        }
        assert_eq!(f32_to_f16(65504.0), 0x7bff);
        assert_eq!(f32_to_f16(65519.99), 0x7bff);
        assert_eq!(f32_to_f16(65520.0), 0x7c00);
        assert_eq!(f32_to_f16(-1e10), 0xfc00);
        assert_eq!(f32_to_f16(1.0 + 1.0 / 2048.0), 0x3c00); // tie to even
        assert_eq!(f32_to_f16(1.0 + 3.0 / 2048.0), 0x3c02);
        assert_eq!(f32_to_f16(2.0f32.powi(-25)), 0x0000); // tie to even (zero)
        assert_eq!(f32_to_f16(3.0 * 2.0f32.powi(-25)), 0x0002);
        assert_eq!(f32_to_f16(f32::from_bits(1)), 0);
        assert_eq!(f32_to_f16(f32::from_bits(0x7fc1_2345)), 0x7e09);
        assert_eq!(f32_to_f16(f32::from_bits(0x7f80_0001)), 0x7e00);
    }

    #[test]
    fn round_to_f16_is_the_round_trip() {
        let mut seed = 11;
        let check = |x: f32| {
            let want = f16_to_f32(f32_to_f16(x));
            let got = round_to_f16(x);
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{x:e} ({:#x}): {got:e} != {want:e}",
                x.to_bits()
            );
        };
        for bits in (0..=u32::MAX).step_by(4099) {
            check(f32::from_bits(bits));
        }
        for _ in 0..100_000 {
            check(lcg(&mut seed) * 2.0f32.powi((lcg(&mut seed) * 10.0) as i32));
        }
        for x in [
            65504.0,
            65519.99,
            65520.0,
            6.1e-5,
            2.0f32.powi(-25),
            3.0 * 2.0f32.powi(-25),
        ] {
            check(x);
            check(-x);
        }
    }

    #[test]
    fn int8_rows_match_a_direct_transcription() {
        let mut seed = 3;
        let (rows, cols) = (13, 37);
        let values: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut seed)).collect();
        let mut out = vec![0i8; rows * cols];
        let mut scb = vec![0f32; rows];
        quantize_int8(&f32_bytes(&values), Dtype::F32, cols, &mut out, &mut scb, 4).unwrap();
        for r in 0..rows {
            let row: Vec<f32> = values[r * cols..][..cols]
                .iter()
                .map(|&v| f16_to_f32(f32_to_f16(v)))
                .collect();
            let s = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(scb[r], s);
            for (c, v) in row.iter().enumerate() {
                assert_eq!(
                    out[r * cols + c],
                    (v * ((1.0 / s) * 127.0)).round_ties_even() as i8
                );
            }
        }
    }

    #[test]
    fn int8_special_rows() {
        let values = [0.0, 0.0, f32::INFINITY, 1.0, f32::NAN, 1.0, 1e6, 2.0];
        let mut out = [1i8; 8];
        let mut scb = [0f32; 4];
        quantize_int8(&f32_bytes(&values), Dtype::F32, 2, &mut out, &mut scb, 1).unwrap();
        assert_eq!(out, [0; 8]);
        assert_eq!(scb[0], 0.0);
        assert_eq!(scb[1], f32::INFINITY);
        assert_eq!(scb[2].to_bits(), 0x7fff_ffff); // a tail row: torch's scalar NaN
        assert_eq!(scb[3], f32::INFINITY); // 1e6 overflows f16
    }

    // --- the SIMD loops against the generic ones ------------------------------------
    //
    // The helpers below call the hand-written loop directly (NEON on aarch64; on x86-64
    // `full_blocks` / `int8_rows`, whatever this CPU picks) and the generic loop, with
    // the same partial block and row bookkeeping as `run_4bit` / `run_int8` on one
    // thread, so that no test depends on `FORCE_GENERIC_PACKING`, which others toggle.

    /// `full_blocks` by the SIMD loop (`simd`) or the generic one, then the partial block.
    fn q4_path<S: Source, C: Code>(input: &[u8], bs: usize, simd: bool) -> (Vec<u8>, Vec<u32>) {
        let n = input.len() / S::BYTES;
        let mut packed = vec![0xaa; packed_len(n)];
        let mut absmax = vec![-1.0; blocks(n, bs)];
        let split = n / bs * bs;
        let (full_in, tail_in) = input.split_at(split * S::BYTES);
        let (full_out, tail_out) = packed.split_at_mut(split / 2);
        let (full_absmax, tail_absmax) = absmax.split_at_mut(n / bs);
        if !simd {
            full_blocks_generic::<S, C>(full_in, bs, full_out, full_absmax);
        } else {
            #[cfg(target_arch = "aarch64")]
            // SAFETY: NEON is in the aarch64 baseline (`neon_is_detected` checks it)
            unsafe {
                neon::full_blocks_neon::<S, C>(full_in, bs, full_out, full_absmax)
            };
            #[cfg(not(target_arch = "aarch64"))]
            full_blocks::<S, C>(full_in, bs, full_out, full_absmax);
        }
        if let Some(am) = tail_absmax.first_mut() {
            partial_block::<S, C>(tail_in, tail_out, am);
        }
        (packed, absmax.iter().map(|a| a.to_bits()).collect())
    }

    fn check_4bit<S: Source, C: Code>(input: &[u8], bs: usize, what: &str) {
        let simd = q4_path::<S, C>(input, bs, true);
        let generic = q4_path::<S, C>(input, bs, false);
        if simd != generic {
            let n = input.len() / S::BYTES;
            let byte = simd.0.iter().zip(&generic.0).position(|(a, b)| a != b);
            let block = simd.1.iter().zip(&generic.1).position(|(a, b)| a != b);
            panic!("{what}: n={n} bs={bs}: first packed byte differing {byte:?}, first absmax {block:?}");
        }
    }

    /// Both code books: the SIMD loop against the generic one, bit for bit.
    fn check_4bit_both(dtype: Dtype, input: &[u8], bs: usize, what: &str) {
        match dtype {
            Dtype::BF16 => {
                check_4bit::<Bf16, Nf4>(input, bs, &format!("{what} bf16 nf4"));
                check_4bit::<Bf16, Fp4>(input, bs, &format!("{what} bf16 fp4"));
            }
            Dtype::F16 => {
                check_4bit::<F16, Nf4>(input, bs, &format!("{what} f16 nf4"));
                check_4bit::<F16, Fp4>(input, bs, &format!("{what} f16 fp4"));
            }
            Dtype::F32 => {
                check_4bit::<F32, Nf4>(input, bs, &format!("{what} f32 nf4"));
                check_4bit::<F32, Fp4>(input, bs, &format!("{what} f32 fp4"));
            }
            _ => unreachable!(),
        }
    }

    /// `int8_rows` by the SIMD loop (`simd`) or the generic one, as `run_int8` on one thread.
    fn int8_path<S: Source>(input: &[u8], cols: usize, simd: bool) -> (Vec<i8>, Vec<u32>) {
        let n = input.len() / S::BYTES;
        let rows = n / cols;
        let mut out = vec![0x55i8; n];
        let mut scb = vec![-1f32; rows];
        let tail_from = rows - rows % 8;
        if !simd {
            int8_rows_generic::<S>(input, cols, 0, tail_from, &mut out, &mut scb);
        } else {
            #[cfg(target_arch = "aarch64")]
            // SAFETY: NEON is in the aarch64 baseline (`neon_is_detected` checks it)
            unsafe {
                neon::int8_rows_neon::<S>(input, cols, 0, tail_from, &mut out, &mut scb)
            };
            #[cfg(not(target_arch = "aarch64"))]
            int8_rows::<S>(input, cols, 0, tail_from, &mut out, &mut scb);
        }
        (out, scb.iter().map(|s| s.to_bits()).collect())
    }

    fn check_int8(dtype: Dtype, input: &[u8], cols: usize, what: &str) {
        let (simd, generic) = match dtype {
            Dtype::BF16 => (
                int8_path::<Bf16>(input, cols, true),
                int8_path::<Bf16>(input, cols, false),
            ),
            Dtype::F16 => (
                int8_path::<F16>(input, cols, true),
                int8_path::<F16>(input, cols, false),
            ),
            Dtype::F32 => (
                int8_path::<F32>(input, cols, true),
                int8_path::<F32>(input, cols, false),
            ),
            _ => unreachable!(),
        };
        if simd != generic {
            let at = simd.0.iter().zip(&generic.0).position(|(a, b)| a != b);
            let row = simd.1.iter().zip(&generic.1).position(|(a, b)| a != b);
            panic!("{what} {dtype}: cols={cols}: first value differing {at:?}, first SCB {row:?}");
        }
    }

    /// An element of a generated input: a value to scale, a special value (kept), or a
    /// raw bit pattern whose low bits are taken as they are (any NaN payload,
    /// signalling ones included).
    #[derive(Debug, Clone, Copy)]
    enum Elem {
        Value(f32),
        Special(f32),
        Raw(u32),
    }

    /// Elements as `dtype` bytes, values times `2^scale`.
    fn encode(dtype: Dtype, elements: &[Elem], scale: i32) -> Vec<u8> {
        let factor = 2f32.powi(scale);
        let elements: Vec<(u32, bool)> = elements
            .iter()
            .map(|e| match *e {
                Elem::Value(v) => ((v * factor).to_bits(), false),
                Elem::Special(v) => (v.to_bits(), false),
                Elem::Raw(bits) => (bits, true),
            })
            .collect();
        elements
            .iter()
            .flat_map(|&(bits, raw)| match dtype {
                Dtype::F32 => bits.to_le_bytes().to_vec(),
                Dtype::BF16 if raw => (bits as u16).to_le_bytes().to_vec(),
                Dtype::BF16 => ((bits >> 16) as u16).to_le_bytes().to_vec(),
                Dtype::F16 if raw => (bits as u16).to_le_bytes().to_vec(),
                Dtype::F16 => f32_to_f16(f32::from_bits(bits)).to_le_bytes().to_vec(),
                _ => unreachable!(),
            })
            .collect()
    }

    const DTYPES: [Dtype; 3] = [Dtype::BF16, Dtype::F16, Dtype::F32];

    #[cfg(target_arch = "aarch64")]
    #[test]
    fn neon_is_detected() {
        // the dispatch takes the NEON loops, so the tests above exercise them
        assert!(std::arch::is_aarch64_feature_detected!("neon"));
    }

    #[cfg(target_arch = "aarch64")]
    #[test]
    fn neon_conversions_are_the_scalar_ones() {
        // f16 → f32 of every f16 (NaN payloads and quieting too), and the f16 rounding
        // of every 4099th f32 bit pattern and of the 2^12 patterns on each side of its
        // thresholds (2^-25, 2^-14, 65504, 65520, inf), both signs
        let check = |lanes: [u32; 4]| {
            let (wide, rounded) = neon::conversions(lanes);
            for k in 0..4 {
                let x = lanes[k];
                assert_eq!(wide[k], f16_to_f32(x as u16).to_bits(), "f16 {x:#x}");
                assert_eq!(
                    rounded[k],
                    round_to_f16(f32::from_bits(x)).to_bits(),
                    "{x:#x}"
                );
            }
        };
        for h in (0..=u16::MAX).step_by(4) {
            check([0, 1, 2, 3].map(|k| u32::from(h) + k));
        }
        let mut patterns: Vec<u32> = (0..=u32::MAX).step_by(4099).collect();
        for edge in [
            0x3300_0000u32,
            0x3880_0000,
            0x477f_e000,
            0x477f_f000,
            0x7f80_0000,
        ] {
            for sign in [0, 0x8000_0000] {
                patterns.extend((edge - 4096..=edge + 4096).map(|b| b | sign));
            }
        }
        patterns.resize(patterns.len().next_multiple_of(4), 0);
        for lanes in patterns.chunks_exact(4) {
            check([lanes[0], lanes[1], lanes[2], lanes[3]]);
        }
    }

    #[test]
    fn simd_matches_generic_on_every_16_bit_pattern() {
        // every BF16 and F16 bit pattern (zeros, subnormals, infinities, every NaN
        // payload, signalling ones included), in order (blocks of near-equal
        // magnitudes) and shuffled (blocks of mixed ones), for block sizes from the
        // smallest to the largest, plus a partial block; and as int8 rows of several widths (column tails, NaN rows,
        // the last rows % 8)
        let mut seed = 5u64;
        let ordered: Vec<u16> = (0..=u16::MAX).collect();
        let mut shuffled = ordered.clone();
        for i in (1..shuffled.len()).rev() {
            lcg(&mut seed);
            shuffled.swap(i, (seed >> 33) as usize % (i + 1));
        }
        for dtype in [Dtype::BF16, Dtype::F16] {
            for (name, patterns) in [("ordered", &ordered), ("shuffled", &shuffled)] {
                let mut bytes: Vec<u8> = patterns.iter().flat_map(|h| h.to_le_bytes()).collect();
                for bs in [32, 64, 512, 4096] {
                    check_4bit_both(dtype, &bytes, bs, name);
                }
                for cols in [16, 47, 4096] {
                    let n = patterns.len() / cols * cols;
                    check_int8(dtype, &bytes[..2 * n], cols, name);
                }
                bytes.truncate(2 * 1000); // 31 blocks of 32 and a partial one of 8
                check_4bit_both(dtype, &bytes, 32, name);
            }
        }
    }

    #[test]
    fn simd_matches_generic_at_the_midpoints() {
        // a block whose absmax is 1 (scale exactly 1) holding every midpoint and the
        // 8 values on each side of it, both signs: bucketize's `>=` decides each
        for bs in [32, 64, 128, 256, 512] {
            for bounds in [Nf4::BOUNDS, Fp4::BOUNDS] {
                let mut values = vec![1.0f32];
                for b in bounds.iter().chain(&[0.0, -0.0, 1.0, -1.0]) {
                    for d in -8i32..=8 {
                        values.push(f32::from_bits(b.to_bits().wrapping_add_signed(d)));
                        values.push(-f32::from_bits(b.to_bits().wrapping_add_signed(d)));
                    }
                }
                values.resize(values.len().next_multiple_of(bs), 0.5);
                check_4bit_both(Dtype::F32, &f32_bytes(&values), bs, "f32 midpoints");
                // bf16: the 8 bf16 values on each side of each midpoint
                let mut values = vec![1.0f32];
                for b in &bounds {
                    let top = b.to_bits() & 0xffff_0000;
                    for d in -8i32..=8 {
                        let v = f32::from_bits(top.wrapping_add_signed(d << 16));
                        values.extend([v, -v]);
                    }
                }
                values.resize(values.len().next_multiple_of(bs), 0.5);
                check_4bit_both(Dtype::BF16, &bf16_bytes(&values), bs, "bf16 midpoints");
            }
        }
    }

    /// One element: mostly values of a moderate size (times `2^scale` per case), and
    /// special values and raw bit patterns often enough that a block or row meets them.
    fn element() -> impl Strategy<Value = Elem> {
        let specials = [
            0.0f32,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7f80_0001), // signalling
            f32::from_bits(0xffc1_2345),
            f32::from_bits(1), // subnormal
            -1e-40,
            6e-8, // f16 subnormal
            65504.0,
            65520.0, // f16 overflow
            1.0,
            -1.0,
        ];
        prop_oneof![
            12 => (-4.0f32..4.0).prop_map(Elem::Value),
            1 => proptest::sample::select(specials.to_vec()).prop_map(Elem::Special),
            1 => any::<u32>().prop_map(Elem::Raw),
        ]
    }

    /// Not a test: ns per value of the SIMD loops (NEON on aarch64) and the generic ones
    /// on the same input, one thread, best of `QUANT_BENCH_ITERS` runs (default 5):
    /// `cargo test --release -- --ignored --nocapture simd_speed`. Under qemu-user the
    /// times are the emulator's, not a CPU's: only the ratio on the same emulator means
    /// anything, and not much. `QUANT_BENCH_VALUES` sets the input size (default 2^20, a
    /// multiple of 4096); `QUANT_BENCH_ONLY=<line>-simd` or `<line>-generic` runs that
    /// once and prints nothing (for counting executed instructions under
    /// `qemu-aarch64 -singlestep -d exec,nochain`, less a run with `QUANT_BENCH_ONLY=none`).
    #[test]
    #[ignore]
    fn simd_speed_against_generic() {
        use std::time::Instant;
        let iters: usize = std::env::var("QUANT_BENCH_ITERS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(5);
        let only = std::env::var("QUANT_BENCH_ONLY").ok();
        let n = std::env::var("QUANT_BENCH_VALUES")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1 << 20);
        let mut seed = 9;
        let values: Vec<f32> = (0..n).map(|_| lcg(&mut seed)).collect();
        let inputs = [
            (Dtype::BF16, bf16_bytes(&values)),
            (
                Dtype::F16,
                encode(
                    Dtype::F16,
                    &values.iter().map(|&v| Elem::Value(v)).collect::<Vec<_>>(),
                    0,
                ),
            ),
            (Dtype::F32, f32_bytes(&values)),
        ];
        let time = |f: &dyn Fn()| {
            (0..iters.max(1))
                .map(|_| {
                    let t = Instant::now();
                    f();
                    t.elapsed().as_secs_f64() * 1e9 / n as f64
                })
                .fold(f64::INFINITY, f64::min)
        };
        println!(
            "{:<16} {:>12} {:>12} {:>8}",
            "ns/value", "simd", "generic", "ratio"
        );
        for (dtype, input) in &inputs {
            let lines: [(&str, &dyn Fn(bool)); 3] = [
                ("nf4", &|simd| match dtype {
                    Dtype::BF16 => drop(q4_path::<Bf16, Nf4>(input, 64, simd)),
                    Dtype::F16 => drop(q4_path::<F16, Nf4>(input, 64, simd)),
                    _ => drop(q4_path::<F32, Nf4>(input, 64, simd)),
                }),
                ("fp4", &|simd| match dtype {
                    Dtype::BF16 => drop(q4_path::<Bf16, Fp4>(input, 64, simd)),
                    Dtype::F16 => drop(q4_path::<F16, Fp4>(input, 64, simd)),
                    _ => drop(q4_path::<F32, Fp4>(input, 64, simd)),
                }),
                ("int8", &|simd| match dtype {
                    Dtype::BF16 => drop(int8_path::<Bf16>(input, 4096, simd)),
                    Dtype::F16 => drop(int8_path::<F16>(input, 4096, simd)),
                    _ => drop(int8_path::<F32>(input, 4096, simd)),
                }),
            ];
            for (what, run) in lines {
                let name = format!("{what} {dtype}").to_lowercase().replace(' ', "-");
                match only.as_deref() {
                    Some(o) if o == format!("{name}-simd") => run(true),
                    Some(o) if o == format!("{name}-generic") => run(false),
                    Some(_) => {}
                    None => {
                        let (s, g) = (time(&|| run(true)), time(&|| run(false)));
                        println!("{name:<16} {s:>12.2} {g:>12.2} {:>7.2}x", g / s);
                    }
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        #[test]
        fn simd_4bit_matches_generic(
            elements in proptest::collection::vec(element(), 0..2200),
            scale in -40i32..40,
            bs in proptest::sample::select(BLOCKSIZES[..5].to_vec()),
        ) {
            for dtype in DTYPES {
                check_4bit_both(dtype, &encode(dtype, &elements, scale), bs, "proptest");
            }
        }

        #[test]
        fn simd_int8_matches_generic(
            elements in proptest::collection::vec(element(), 1..2000),
            scale in -30i32..20,
            cols in 1usize..100,
        ) {
            let n = elements.len() / cols * cols;
            for dtype in DTYPES {
                check_int8(dtype, &encode(dtype, &elements[..n], scale), cols, "proptest");
            }
        }
    }
}
