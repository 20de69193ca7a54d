//! bitsandbytes' AVX512-BF16 CPU layout of a 4-bit weight. No Python.
//!
//! On a CPU with AVX512-BF16, bitsandbytes (0.50) rearranges a `Linear4bit`'s packed
//! weight at its first CPU forward (`bitsandbytes.functional._convert_weight_packed_for_cpu`,
//! `block_n = 32`) for its fused 4-bit kernel. The weight `[N, K]` (N rows of K
//! values; bitsandbytes' plain layout packs element pairs `q[2i] << 4 | q[2i+1]`
//! row-major) becomes `[N, K/2]` bytes where, for every group of 32 rows and every
//! column pair `kp`, 32 consecutive bytes hold the 64 values `q[r][2kp + t]`
//! (`r` in the group, `t` in 0..2): byte `kp * 32 + 2r + t` has row `r`'s value in its
//! low nibble and row `r + 16`'s in its high nibble, for `r` in 0..16.
//!
//! [`pack`] and [`unpack`] convert between the two layouts (a permutation of
//! nibbles, exact both ways); [`quantize_4bit_packed`] quantizes a weight straight
//! into the CPU layout, 32 rows at a time through a scratch buffer that stays in
//! cache, bit-identical to [`quant::quantize_4bit`] followed by [`pack`].
//! bitsandbytes' conversion also turns `absmax` into a transposed bfloat16
//! `[K / blocksize, N]`: [`absmax_to_cpu_layout`], or [`quantize_4bit_packed`] writes
//! it so directly ([`Absmax::CpuLayout`]).

use crate::header::Dtype;
use crate::quant::{self, QuantError, QuantType};
use std::fmt;
use std::thread;

/// Rows packed together (`block_n` of bitsandbytes' conversion).
pub const BLOCK_N: usize = 32;

/// Fewest bytes of output given to one thread.
const MIN_PER_THREAD: usize = 1 << 15;

/// Why a layout call was refused (nothing is written then).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayoutError {
    /// The shape has no CPU layout: rows not a multiple of 32, or odd columns
    /// (bitsandbytes' conversion asserts both).
    Shape { rows: usize, cols: usize },
    /// Columns that are not whole blocks: a block would straddle two rows.
    Blocks { cols: usize, blocksize: usize },
    /// A buffer of the wrong length.
    Len {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    /// The quantizer refused the input.
    Quant(QuantError),
}

impl fmt::Display for LayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LayoutError::Shape { rows, cols } => write!(
                f,
                "a {rows}x{cols} weight has no CPU layout: rows must be a multiple of \
                 {BLOCK_N} and columns even"
            ),
            LayoutError::Blocks { cols, blocksize } => write!(
                f,
                "{cols} columns are not a whole number of {blocksize}-value blocks"
            ),
            LayoutError::Len {
                what,
                expected,
                got,
            } => write!(f, "{what} must have {expected} elements, not {got}"),
            LayoutError::Quant(err) => err.fmt(f),
        }
    }
}

impl std::error::Error for LayoutError {}

impl From<QuantError> for LayoutError {
    fn from(err: QuantError) -> Self {
        LayoutError::Quant(err)
    }
}

fn check_shape(rows: usize, cols: usize) -> Result<(), LayoutError> {
    if rows.is_multiple_of(BLOCK_N) && cols.is_multiple_of(2) {
        Ok(())
    } else {
        Err(LayoutError::Shape { rows, cols })
    }
}

fn check_len(what: &'static str, expected: usize, got: usize) -> Result<(), LayoutError> {
    if expected == got {
        Ok(())
    } else {
        Err(LayoutError::Len {
            what,
            expected,
            got,
        })
    }
}

/// One group of 32 rows, plain (`rows[r * half + kp]`) to the CPU layout: with
/// AVX-512 VBMI where the CPU has it, else one byte at a time.
#[inline(always)]
fn pack_group(plain: &[u8], half: usize, out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vbmi")
        {
            // SAFETY: the CPU has the features the function is compiled for
            let done = unsafe { x86::pack_group_vbmi(plain, half, out) };
            return pack_group_scalar(plain, half, out, done);
        }
    }
    pack_group_scalar(plain, half, out, 0)
}

/// [`pack_group`] for the column pairs from `from` on, a byte at a time.
#[inline(always)]
fn pack_group_scalar(plain: &[u8], half: usize, out: &mut [u8], from: usize) {
    let (top, bottom) = plain.split_at(16 * half);
    for (kp, dst) in out.chunks_exact_mut(BLOCK_N).enumerate().skip(from) {
        for r in 0..16 {
            let lo = top[r * half + kp];
            let hi = bottom[r * half + kp];
            dst[2 * r] = (hi & 0xf0) | (lo >> 4);
            dst[2 * r + 1] = (hi << 4) | (lo & 0x0f);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::BLOCK_N;
    use std::arch::x86_64::*;

    /// Four column pairs at a time: the 4 bytes of each of the 16 top rows (one gather)
    /// and of the 16 bottom ones, their nibbles mixed as the layout mixes them (lane `r`:
    /// low nibbles from row `r`, high ones from row `r + 16`), then each column pair's 32
    /// bytes picked out of the two registers with one byte permute per two pairs.
    /// Returns how many column pairs it did (a multiple of 4); the caller does the rest.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    pub(super) unsafe fn pack_group_vbmi(plain: &[u8], half: usize, out: &mut [u8]) -> usize {
        let quads = half / 4;
        if quads == 0 || half > (i32::MAX as usize) / 16 {
            return 0;
        }
        let mut rows = [0i32; 16];
        for (r, offset) in rows.iter_mut().enumerate() {
            *offset = (r * half) as i32;
        }
        // output byte m of a 64-byte store: column pair m / 32 (of two), row r = m % 32 / 2,
        // t = m % 2: byte (pair) of lane r in the first register (t = 0) or second (+64)
        let mut first = [0u8; 64];
        let mut second = [0u8; 64];
        for m in 0..64 {
            let (j, r, t) = (m / 32, (m % 32) / 2, m % 2);
            first[m] = (r * 4 + j + 64 * t) as u8;
            second[m] = (r * 4 + j + 2 + 64 * t) as u8;
        }
        // SAFETY: loads of local arrays of the right sizes
        let (offsets, first, second) = unsafe {
            (
                _mm512_loadu_si512(rows.as_ptr().cast()),
                _mm512_loadu_si512(first.as_ptr().cast()),
                _mm512_loadu_si512(second.as_ptr().cast()),
            )
        };
        let low = _mm512_set1_epi8(0x0f);
        let high = _mm512_set1_epi8(0xf0u8 as i8);
        let top = plain.as_ptr();
        for q in 0..quads {
            let kp = 4 * q;
            // SAFETY: row r's bytes kp..kp + 4 are inside `plain` (kp + 4 <= half), for the
            // top 16 rows and the bottom 16 (16 * half further); the stores are the 128
            // bytes of column pairs kp..kp + 4, inside `out` (32 bytes each)
            unsafe {
                let t = _mm512_i32gather_epi32::<1>(offsets, top.add(kp).cast());
                let b = _mm512_i32gather_epi32::<1>(offsets, top.add(16 * half + kp).cast());
                let b0 = _mm512_or_si512(
                    _mm512_and_si512(b, high),
                    _mm512_and_si512(_mm512_srli_epi16::<4>(t), low),
                );
                let b1 = _mm512_or_si512(
                    _mm512_and_si512(_mm512_slli_epi16::<4>(b), high),
                    _mm512_and_si512(t, low),
                );
                let dst = out.as_mut_ptr().add(kp * BLOCK_N);
                _mm512_storeu_si512(dst.cast(), _mm512_permutex2var_epi8(b0, first, b1));
                _mm512_storeu_si512(dst.add(64).cast(), _mm512_permutex2var_epi8(b0, second, b1));
            }
        }
        4 * quads
    }
}

/// One group of 32 rows, CPU layout back to plain (row by row, as [`pack_group`]).
#[inline(always)]
fn unpack_group(packed: &[u8], half: usize, plain: &mut [u8]) {
    let (top, bottom) = plain.split_at_mut(16 * half);
    for r in 0..16 {
        let lows = &mut top[r * half..(r + 1) * half];
        let highs = &mut bottom[r * half..(r + 1) * half];
        for ((src, lo), hi) in packed.chunks_exact(BLOCK_N).zip(lows).zip(highs) {
            let (b0, b1) = (src[2 * r], src[2 * r + 1]);
            *lo = (b0 << 4) | (b1 & 0x0f);
            *hi = (b0 & 0xf0) | (b1 >> 4);
        }
    }
}

/// Split `groups` groups of `group_bytes` over threads, calling `work(first_group,
/// inputs, outputs)` on disjoint runs of whole groups.
fn for_groups<I: Sync + ?Sized, F>(
    input: &I,
    out: &mut [u8],
    group_bytes: usize,
    threads: usize,
    work: F,
) where
    F: Fn(&I, usize, &mut [u8]) + Sync,
{
    let groups = out.len() / group_bytes.max(1);
    let threads = threads
        .max(1)
        .min(out.len() / MIN_PER_THREAD + 1)
        .min(groups.max(1));
    if threads <= 1 {
        work(input, 0, out);
        return;
    }
    let per = groups.div_ceil(threads);
    thread::scope(|s| {
        let mut runs = out.chunks_mut(per * group_bytes).enumerate();
        let first = runs.next();
        for (i, run) in runs {
            let work = &work;
            s.spawn(move || work(input, i * per, run));
        }
        if let Some((_, run)) = first {
            work(input, 0, run);
        }
    });
}

/// Plain packed 4-bit bytes of a `[rows, cols]` weight (`rows * cols / 2` bytes) to
/// bitsandbytes' CPU layout, as `_convert_weight_packed_for_cpu` arranges them.
pub fn pack(
    plain: &[u8],
    rows: usize,
    cols: usize,
    out: &mut [u8],
    threads: usize,
) -> Result<(), LayoutError> {
    relayout(
        plain,
        rows,
        cols,
        out,
        threads,
        ("plain", "packed"),
        pack_group,
    )
}

/// The inverse of [`pack`]: bitsandbytes' CPU layout back to plain packed bytes.
pub fn unpack(
    packed: &[u8],
    rows: usize,
    cols: usize,
    out: &mut [u8],
    threads: usize,
) -> Result<(), LayoutError> {
    relayout(
        packed,
        rows,
        cols,
        out,
        threads,
        ("packed", "plain"),
        unpack_group,
    )
}

/// `group_fn` on each group of 32 rows of `src` into `out`; `names`: the two layouts.
fn relayout(
    src: &[u8],
    rows: usize,
    cols: usize,
    out: &mut [u8],
    threads: usize,
    names: (&'static str, &'static str),
    group_fn: fn(&[u8], usize, &mut [u8]),
) -> Result<(), LayoutError> {
    check_shape(rows, cols)?;
    let bytes = rows * cols / 2;
    check_len(names.0, bytes, src.len())?; // "plain"/"packed" weight bytes
    check_len(names.1, bytes, out.len())?;
    let group = BLOCK_N * cols / 2;
    for_groups(src, out, group, threads, |src, first, run| {
        let src = &src[first * group..];
        for (g, dst) in run.chunks_exact_mut(group).enumerate() {
            group_fn(&src[g * group..(g + 1) * group], cols / 2, dst);
        }
    });
    Ok(())
}

/// Where [`quantize_4bit_packed`] writes the scales of a `[rows, cols]` weight.
pub enum Absmax<'a> {
    /// One f32 per block in bitsandbytes' plain order (row-major blocks).
    Plain(&'a mut [f32]),
    /// The CPU layout's: what [`absmax_to_cpu_layout`] makes of the plain ones
    /// (bfloat16 `[cols / blocksize, rows]`, little-endian bytes), written group by
    /// group while they are in cache.
    CpuLayout(&'a mut [u8]),
}

/// Quantize a row-major `[rows, cols]` weight (raw `dtype` bytes) to 4 bits straight
/// into the CPU layout: `out` gets `rows * cols / 2` bytes, `absmax` the scales (one
/// per block, plain or already in the CPU layout). Each row must be whole blocks.
/// Bit-identical to [`quant::quantize_4bit`] then [`pack`] (and
/// [`absmax_to_cpu_layout`]).
#[allow(clippy::too_many_arguments)]
pub fn quantize_4bit_packed(
    input: &[u8],
    dtype: Dtype,
    quant_type: QuantType,
    blocksize: usize,
    rows: usize,
    cols: usize,
    out: &mut [u8],
    absmax: Absmax<'_>,
    threads: usize,
) -> Result<(), LayoutError> {
    check_shape(rows, cols)?;
    if !quant::BLOCKSIZES.contains(&blocksize) {
        return Err(QuantError::Blocksize(blocksize).into());
    }
    if !cols.is_multiple_of(blocksize) {
        return Err(LayoutError::Blocks { cols, blocksize });
    }
    let size = quant::input_size(dtype)?;
    check_len("input", rows * cols * size, input.len())?;
    check_len("packed weight", rows * cols / 2, out.len())?;
    let per_row = cols / blocksize;
    let (absmax_ptr, bf16) = match absmax {
        Absmax::Plain(am) => {
            check_len("absmax", rows * per_row, am.len())?;
            (SendPtr(am.as_mut_ptr().cast()), false)
        }
        Absmax::CpuLayout(am) => {
            check_len("bfloat16 absmax bytes", 2 * rows * per_row, am.len())?;
            (SendPtr(am.as_mut_ptr()), true)
        }
    };
    // absmax is split with the groups: each thread writes its own blocks (plain), or
    // its own 32 columns of each row of the transposed scales (CPU layout)
    let group = BLOCK_N * cols / 2;
    let group_blocks = BLOCK_N * per_row;
    let mut failed: Option<QuantError> = None;
    let failure = std::sync::Mutex::new(&mut failed);
    for_groups(input, out, group, threads, |input, first, run| {
        let mut scratch = vec![0u8; group];
        let mut scales = vec![0f32; if bf16 { group_blocks } else { 0 }];
        let groups = run.len() / group;
        let input = &input[first * group * 2 * size..];
        for (g, dst) in run.chunks_exact_mut(group).enumerate() {
            let src = &input[g * group * 2 * size..(g + 1) * group * 2 * size];
            let at = first + g;
            let blocks: &mut [f32] = if bf16 {
                &mut scales
            } else {
                // SAFETY: the blocks of group `at`, written by this thread only; the
                // slice lives as long as `absmax`, borrowed exclusively by this function
                unsafe {
                    std::slice::from_raw_parts_mut(
                        absmax_ptr.get().cast::<f32>().add(at * group_blocks),
                        group_blocks,
                    )
                }
            };
            if let Err(err) =
                quant::quantize_4bit(src, dtype, quant_type, blocksize, &mut scratch, blocks, 1)
            {
                **failure.lock().unwrap() = Some(err);
                return;
            }
            pack_group(&scratch, cols / 2, dst);
            if bf16 {
                for b in 0..per_row {
                    // SAFETY: row `b`'s 32 columns of group `at` (64 bytes), written by
                    // this thread only, inside the buffer checked above
                    let column = unsafe {
                        std::slice::from_raw_parts_mut(
                            absmax_ptr.get().add(2 * (b * rows + at * BLOCK_N)),
                            2 * BLOCK_N,
                        )
                    };
                    for (r, dst) in column.chunks_exact_mut(2).enumerate() {
                        dst.copy_from_slice(&bf16_bits(scales[r * per_row + b]).to_le_bytes());
                    }
                }
            }
        }
        debug_assert_eq!(groups * group, run.len());
    });
    match failed {
        Some(err) => Err(err.into()),
        None => Ok(()),
    }
}

/// `value` rounded to bfloat16 as torch's CPU conversion does: to nearest even,
/// every NaN `0xFFFF`.
#[inline(always)]
fn bf16_bits(value: f32) -> u16 {
    let bits = value.to_bits();
    if value.is_nan() {
        0xffff
    } else {
        (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16
    }
}

/// bitsandbytes' CPU-layout `absmax`: the plain float32 scales of a `[rows, cols]`
/// weight (`rows * per_row` of them, row-major) transposed to `[per_row, rows]` and
/// rounded to bfloat16, as `absmax.reshape(rows, per_row).T.to(torch.bfloat16)
/// .contiguous()` gives them: round to nearest even, every NaN `0xFFFF` (torch's CPU
/// conversion). `out` holds the bfloat16 values' little-endian bytes.
pub fn absmax_to_cpu_layout(
    absmax: &[f32],
    rows: usize,
    per_row: usize,
    out: &mut [u8],
) -> Result<(), LayoutError> {
    let n = rows * per_row;
    check_len("absmax", n, absmax.len())?;
    check_len("bfloat16 absmax bytes", 2 * n, out.len())?;
    if n == 0 {
        return Ok(());
    }
    // written in order, read with a stride (the scales of one weight fit in cache)
    for (j, column) in out.chunks_exact_mut(2 * rows).enumerate() {
        for (dst, &value) in column
            .chunks_exact_mut(2)
            .zip(absmax[j..].iter().step_by(per_row))
        {
            dst.copy_from_slice(&bf16_bits(value).to_le_bytes());
        }
    }
    Ok(())
}

/// Dequantize a `[rows, cols]` 4-bit weight held in the CPU layout (`packed`,
/// `rows * cols / 2` bytes; `absmax`: its bfloat16 `[cols / blocksize, rows]` scales,
/// little-endian bytes) into the **transposed** weight `[cols, rows]`, bfloat16 bits:
/// `out[k * rows + r]` is `code[q[r][k]] * absmax[k / blocksize][r]`, multiplied in
/// float32 and rounded to nearest even (every NaN `0xFFFF`), as bitsandbytes'
/// `dequantize_4bit` to bfloat16 computes each value. Transposed because the layout
/// holds, for each column pair, the 32 rows of a group together: the output is written
/// in contiguous runs of 16 rows (a row-major `[rows, cols]` would be a scatter).
/// `x @ out` is then `F.linear(x, W)`.
#[allow(clippy::too_many_arguments)]
pub fn dequantize_transposed(
    packed: &[u8],
    absmax: &[u8],
    code: &[f32],
    rows: usize,
    cols: usize,
    blocksize: usize,
    out: &mut [u8],
    threads: usize,
) -> Result<(), LayoutError> {
    check_shape(rows, cols)?;
    if blocksize == 0 || !blocksize.is_multiple_of(2) || !cols.is_multiple_of(blocksize) {
        return Err(LayoutError::Blocks { cols, blocksize });
    }
    check_len("packed", rows * cols / 2, packed.len())?;
    check_len(
        "bfloat16 absmax bytes",
        2 * rows * (cols / blocksize),
        absmax.len(),
    )?;
    check_len("code", 16, code.len())?;
    check_len("bfloat16 output bytes", 2 * rows * cols, out.len())?;
    let mut lut = [0f32; 16];
    lut.copy_from_slice(code);
    let group = BLOCK_N * cols / 2; // bytes of one 32-row group
                                    // a unit of work: one column pair of the output (2 rows of 2 * rows bytes each)
    for_groups(packed, out, 4 * rows, threads, |packed, first, run| {
        for (i, pair) in run.chunks_exact_mut(4 * rows).enumerate() {
            let kp = first + i;
            let scales = &absmax[2 * rows * (2 * kp / blocksize)..][..2 * rows];
            let (even, odd) = pair.split_at_mut(2 * rows);
            for g in 0..rows / BLOCK_N {
                let src = &packed[g * group + kp * BLOCK_N..][..BLOCK_N];
                let s = &scales[2 * BLOCK_N * g..][..2 * BLOCK_N];
                let o0 = &mut even[2 * BLOCK_N * g..][..2 * BLOCK_N];
                let o1 = &mut odd[2 * BLOCK_N * g..][..2 * BLOCK_N];
                dequantize_pair(src, s, &lut, o0, o1);
            }
        }
    });
    Ok(())
}

/// One column pair of one group: 32 bytes to the 32 rows of each of the two columns.
#[inline(always)]
fn dequantize_pair(src: &[u8], scales: &[u8], lut: &[f32; 16], o0: &mut [u8], o1: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the feature the function is compiled for; the slices
            // have the lengths it reads and writes (checked by the caller's slicing)
            unsafe { x86_dequant::pair(src, scales, lut, o0, o1) };
            return;
        }
    }
    dequantize_pair_scalar(src, scales, lut, o0, o1);
}

#[inline(always)]
fn dequantize_pair_scalar(
    src: &[u8],
    scales: &[u8],
    lut: &[f32; 16],
    o0: &mut [u8],
    o1: &mut [u8],
) {
    let scale = |r: usize| {
        f32::from_bits(u32::from(u16::from_le_bytes([scales[2 * r], scales[2 * r + 1]])) << 16)
    };
    let put = |o: &mut [u8], r: usize, nibble: u8| {
        let value = lut[usize::from(nibble)] * scale(r);
        o[2 * r..2 * r + 2].copy_from_slice(&bf16_bits(value).to_le_bytes());
    };
    for r in 0..16 {
        let (b0, b1) = (src[2 * r], src[2 * r + 1]);
        put(o0, r, b0 & 0x0f);
        put(o0, r + 16, b0 >> 4);
        put(o1, r, b1 & 0x0f);
        put(o1, r + 16, b1 >> 4);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86_dequant {
    use std::arch::x86_64::*;

    /// 16 floats to bfloat16 bits as [`super::bf16_bits`] rounds them, stored at `dst`.
    #[target_feature(enable = "avx512f")]
    unsafe fn store_bf16(dst: *mut u8, x: __m512) {
        let bits = _mm512_castps_si512(x);
        let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
        let bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff));
        let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(bits, bias));
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
        let rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0xffff));
        // SAFETY: the caller's `dst` has 32 writable bytes
        unsafe { _mm256_storeu_si256(dst.cast(), _mm512_cvtepi32_epi16(rounded)) };
    }

    /// [`super::dequantize_pair_scalar`] 16 rows at a time: lane `r` of the 16 byte pairs
    /// holds `b0 | b1 << 8`, whose four nibbles are rows `r` and `r + 16` of the two
    /// columns; each nibble indexes the 16-entry code book in a register.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn pair(
        src: &[u8],
        scales: &[u8],
        lut: &[f32; 16],
        o0: &mut [u8],
        o1: &mut [u8],
    ) {
        assert!(src.len() >= 32 && scales.len() >= 64 && o0.len() >= 64 && o1.len() >= 64);
        // SAFETY: lengths asserted above
        unsafe {
            let book = _mm512_loadu_ps(lut.as_ptr());
            let w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(src.as_ptr().cast()));
            let m = _mm512_set1_epi32(0x0f);
            let s_lo = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                _mm256_loadu_si256(scales.as_ptr().cast()),
            )));
            let s_hi = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                _mm256_loadu_si256(scales.as_ptr().add(32).cast()),
            )));
            let value = |shift: __m512i, scale: __m512| {
                let nibble = _mm512_and_si512(_mm512_srlv_epi32(w, shift), m);
                _mm512_mul_ps(_mm512_permutexvar_ps(nibble, book), scale)
            };
            store_bf16(o0.as_mut_ptr(), value(_mm512_set1_epi32(0), s_lo));
            store_bf16(o0.as_mut_ptr().add(32), value(_mm512_set1_epi32(4), s_hi));
            store_bf16(o1.as_mut_ptr(), value(_mm512_set1_epi32(8), s_lo));
            store_bf16(o1.as_mut_ptr().add(32), value(_mm512_set1_epi32(12), s_hi));
        }
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut u8);
// SAFETY: used only to hand disjoint ranges of one buffer to scoped threads.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut u8 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// bitsandbytes' conversion as written in torch, index by index:
    /// `[N, K] -> [N/32, 32, K/2, 2] -> transpose(1, 2) -> [-1, 64]`, then
    /// `(high 32 << 4) | low 32`.
    fn reference(codes: &[u8], rows: usize, cols: usize) -> Vec<u8> {
        let half = cols / 2;
        let mut moved = Vec::with_capacity(codes.len());
        for nb in 0..rows / 32 {
            for kp in 0..half {
                for r in 0..32 {
                    for t in 0..2 {
                        moved.push(codes[(nb * 32 + r) * cols + 2 * kp + t]);
                    }
                }
            }
        }
        moved
            .chunks_exact(64)
            .flat_map(|row| (0..32).map(move |j| (row[32 + j] << 4) | row[j]))
            .collect()
    }

    fn codes(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
                (s >> 60) as u8
            })
            .collect()
    }

    fn plain(codes: &[u8]) -> Vec<u8> {
        codes.chunks_exact(2).map(|p| p[0] << 4 | p[1]).collect()
    }

    #[test]
    fn pack_is_bitsandbytes_conversion_and_unpack_inverts_it() {
        for &(rows, cols) in &[(32, 2), (32, 64), (64, 6), (64, 22), (96, 128), (256, 2048)] {
            let c = codes(rows * cols, (rows * cols) as u64);
            let p = plain(&c);
            for threads in [1, 2, 5] {
                let mut out = vec![0; p.len()];
                pack(&p, rows, cols, &mut out, threads).unwrap();
                assert_eq!(out, reference(&c, rows, cols), "{rows}x{cols}");
                let mut back = vec![0; p.len()];
                unpack(&out, rows, cols, &mut back, threads).unwrap();
                assert_eq!(back, p, "{rows}x{cols}");
            }
        }
    }

    #[test]
    fn absmax_is_transposed_and_rounded_to_nearest_even() {
        let values = [
            1.0,
            f32::from_bits(0x3f80_8000), // a tie: to even (down)
            f32::from_bits(0x3f81_8000), // a tie: to even (up)
            f32::from_bits(0x3f80_8001),
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            f32::MAX,
        ];
        let mut out = vec![0u8; 16];
        absmax_to_cpu_layout(&values, 2, 4, &mut out).unwrap();
        let got: Vec<u16> = out
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        // [2, 4] -> [4, 2]: column j of the rows first
        let expect = [
            0x3f80, 0xffff, 0x3f80, 0xffff, 0x3f82, 0x7f80, 0x3f81, 0x7f80,
        ];
        assert_eq!(got, expect);
        assert!(absmax_to_cpu_layout(&values, 3, 4, &mut out).is_err());
    }

    #[test]
    fn dequantize_transposed_is_each_value_times_its_scale() {
        // the NF4 code book; scales with a NaN, an infinity, a subnormal and a zero
        let book: Vec<f32> = (0..16).map(|i| (i as f32 - 7.5) / 7.5 * 0.913).collect();
        let shapes = [
            (32, 64, 64),
            (64, 256, 64),
            (96, 128, 32),
            (32, 130, 2),
            (64, 1024, 64),
        ];
        for (rows, cols, blocksize) in shapes {
            let q = codes(rows * cols, (rows * cols) as u64);
            let per_row = cols / blocksize;
            let mut absmax: Vec<f32> = codes(rows * per_row, 7)
                .iter()
                .enumerate()
                .map(|(i, &c)| (f32::from(c) + 1.0) * 0.37 + i as f32 * 1e-3)
                .collect();
            let n = absmax.len();
            absmax[0] = f32::NAN;
            absmax[1 % n] = f32::INFINITY;
            absmax[2 % n] = 1e-40;
            absmax[3 % n] = 0.0;
            let mut packed = vec![0u8; rows * cols / 2];
            pack(&plain(&q), rows, cols, &mut packed, 1).unwrap();
            let mut scales = vec![0u8; 2 * rows * per_row];
            absmax_to_cpu_layout(&absmax, rows, per_row, &mut scales).unwrap();
            for threads in [1, 3] {
                let mut out = vec![0u8; 2 * rows * cols];
                dequantize_transposed(
                    &packed, &scales, &book, rows, cols, blocksize, &mut out, threads,
                )
                .unwrap();
                for r in 0..rows {
                    for k in 0..cols {
                        let scale = f32::from_bits(
                            u32::from(bf16_bits(absmax[r * per_row + k / blocksize])) << 16,
                        );
                        let want = bf16_bits(book[usize::from(q[r * cols + k])] * scale);
                        let at = 2 * (k * rows + r);
                        let got = u16::from_le_bytes([out[at], out[at + 1]]);
                        assert_eq!(got, want, "{rows}x{cols} row {r} col {k}");
                    }
                }
            }
        }
        let mut out = vec![0u8; 2 * 32 * 64];
        let err = dequantize_transposed(&[0; 1024], &[0; 64], &[0.0; 16], 32, 64, 48, &mut out, 1);
        assert_eq!(
            err,
            Err(LayoutError::Blocks {
                cols: 64,
                blocksize: 48
            })
        );
    }

    #[test]
    fn shapes_without_a_layout_are_refused() {
        let mut out = vec![0; 48];
        assert_eq!(
            pack(&[0; 48], 48, 2, &mut out, 1),
            Err(LayoutError::Shape { rows: 48, cols: 2 })
        );
        assert!(matches!(
            pack(&[0; 47], 32, 3, &mut out, 1),
            Err(LayoutError::Shape { .. })
        ));
        assert!(matches!(
            unpack(&[0; 10], 32, 2, &mut out, 1),
            Err(LayoutError::Len { .. })
        ));
        let input = vec![0u8; 32 * 96 * 2];
        let mut out = vec![0; 32 * 48];
        let mut am = vec![0.0; 48];
        assert_eq!(
            quantize_4bit_packed(
                &input,
                Dtype::BF16,
                QuantType::Nf4,
                64,
                32,
                96,
                &mut out,
                Absmax::Plain(&mut am),
                1
            ),
            Err(LayoutError::Blocks {
                cols: 96,
                blocksize: 64
            })
        );
        assert!(matches!(
            quantize_4bit_packed(
                &input,
                Dtype::I8,
                QuantType::Nf4,
                32,
                32,
                96,
                &mut out,
                Absmax::Plain(&mut am),
                1
            ),
            Err(LayoutError::Quant(QuantError::Dtype(Dtype::I8)))
        ));
        let mut bf16 = vec![0; 2 * 32 * 3 - 2];
        assert!(matches!(
            quantize_4bit_packed(
                &input,
                Dtype::BF16,
                QuantType::Nf4,
                32,
                32,
                96,
                &mut out,
                Absmax::CpuLayout(&mut bf16),
                1
            ),
            Err(LayoutError::Len { .. })
        ));
    }

    #[test]
    fn quantize_packed_is_quantize_then_pack() {
        let mut seed = 7u64;
        for &(rows, cols, bs) in &[
            (32, 64, 64),
            (64, 256, 32),
            (96, 512, 128),
            (128, 4096, 4096),
        ] {
            let values: Vec<u8> = (0..rows * cols)
                .flat_map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(3);
                    let v = ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0;
                    ((v.to_bits() >> 16) as u16).to_le_bytes()
                })
                .collect();
            for qt in [QuantType::Nf4, QuantType::Fp4] {
                let n = rows * cols;
                let mut p = vec![0; n / 2];
                let mut am = vec![0.0f32; n / bs];
                quant::quantize_4bit(&values, Dtype::BF16, qt, bs, &mut p, &mut am, 1).unwrap();
                let mut expect = vec![0; n / 2];
                pack(&p, rows, cols, &mut expect, 1).unwrap();
                for threads in [1, 2, 3] {
                    let mut out = vec![0xaa; n / 2];
                    let mut am2 = vec![-1.0f32; n / bs];
                    quantize_4bit_packed(
                        &values,
                        Dtype::BF16,
                        qt,
                        bs,
                        rows,
                        cols,
                        &mut out,
                        Absmax::Plain(&mut am2),
                        threads,
                    )
                    .unwrap();
                    assert_eq!(out, expect, "{rows}x{cols} {qt}");
                    let bits = |a: &[f32]| a.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&am2), bits(&am), "{rows}x{cols} {qt}");
                    // the scales straight into the CPU layout: the conversion's bytes
                    let mut expect_bf16 = vec![0; 2 * n / bs];
                    absmax_to_cpu_layout(&am, rows, cols / bs, &mut expect_bf16).unwrap();
                    let mut out2 = vec![0xaa; n / 2];
                    let mut bf16 = vec![0x55; 2 * n / bs];
                    quantize_4bit_packed(
                        &values,
                        Dtype::BF16,
                        qt,
                        bs,
                        rows,
                        cols,
                        &mut out2,
                        Absmax::CpuLayout(&mut bf16),
                        threads,
                    )
                    .unwrap();
                    assert_eq!(out2, expect, "{rows}x{cols} {qt}");
                    assert_eq!(bf16, expect_bf16, "{rows}x{cols} {qt} bf16 absmax");
                }
            }
        }
    }
}
