//! The PyO3 functions of `leanstream._core` for the native quantizer
//! ([`crate::quant`]): `quantize_4bit`, `quantize_int8`, `codebook`; and for
//! bitsandbytes' AVX512-BF16 CPU layout ([`crate::cpu_layout`]):
//! `quantize_4bit_cpu_layout`, `pack_4bit_cpu_layout`, `unpack_4bit_cpu_layout`;
//! and the outputs of `TensorStream.quantize_4bit_next` / `quantize_int8_next`
//! ([`crate::pieces`]).
//!
//! Zero-copy both ways: the input is any C-contiguous buffer of bytes (a
//! `TensorView`, or a tensor's bytes as a NumPy array), and the outputs are
//! writable C-contiguous buffers the caller allocated — in leanstream, the
//! `.numpy()` views of fresh `torch.empty` tensors, so the results are torch
//! tensors from the start and nothing is copied afterwards. The buffers are
//! held (`PyBuffer`) for the whole call, the GIL is released around the kernel
//! (`py.detach`), and the worker threads only see plain slices.

use crate::cpu_layout::{self, LayoutError};
use crate::header::Dtype;
use crate::pieces::Outputs;
use crate::quant::{self, QuantError, QuantType};
use pyo3::buffer::{Element, PyBuffer};
use pyo3::exceptions::{PyBufferError, PyValueError};
use pyo3::prelude::*;
use std::ops::Range;

impl From<QuantError> for PyErr {
    fn from(err: QuantError) -> PyErr {
        PyValueError::new_err(err.to_string())
    }
}

impl From<LayoutError> for PyErr {
    fn from(err: LayoutError) -> PyErr {
        PyValueError::new_err(err.to_string())
    }
}

fn contiguous<T: Element>(buf: &PyBuffer<T>, what: &str) -> PyResult<(*mut T, usize)> {
    if buf.item_count() == 0 {
        // an empty buffer's pointer may be null: no slice may be made from it
        return Ok((std::ptr::NonNull::dangling().as_ptr(), 0));
    }
    let ptr = buf
        .as_slice_ptr()
        .ok_or_else(|| PyBufferError::new_err(format!("{what} must be a C-contiguous buffer")))?;
    Ok((ptr.as_ptr().cast::<T>(), ptr.len()))
}

pub(crate) fn writable<T: Element>(buf: &PyBuffer<T>, what: &str) -> PyResult<(*mut T, usize)> {
    if buf.readonly() {
        return Err(PyBufferError::new_err(format!(
            "{what} must be a writable buffer"
        )));
    }
    contiguous(buf, what)
}

fn span<T>(ptr: *mut T, len: usize) -> Range<usize> {
    let start = ptr as usize;
    start..start + len * std::mem::size_of::<T>()
}

fn check_disjoint(spans: &[(&str, Range<usize>)]) -> PyResult<()> {
    for (i, (a, ra)) in spans.iter().enumerate() {
        for (b, rb) in &spans[i + 1..] {
            if ra.start < rb.end && rb.start < ra.end {
                return Err(PyValueError::new_err(format!(
                    "{a} and {b} must not share memory"
                )));
            }
        }
    }
    Ok(())
}

fn parse_dtype(dtype: &str) -> PyResult<Dtype> {
    Dtype::parse(dtype)
        .ok_or_else(|| PyValueError::new_err(format!("unknown dtype {dtype:?} (BF16, F16 or F32)")))
}

fn parse_quant_type(quant_type: &str) -> PyResult<QuantType> {
    QuantType::parse(quant_type).ok_or_else(|| {
        PyValueError::new_err(format!(
            "quant_type must be 'nf4' or 'fp4', not {quant_type:?}"
        ))
    })
}

fn thread_count(threads: Option<usize>) -> usize {
    threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Blockwise 4-bit quantization, bit-identical to bitsandbytes' CPU
/// `quantize_4bit` (see `_core.pyi`).
#[pyfunction]
#[pyo3(signature = (data, dtype, packed, absmax, *, quant_type, blocksize, threads = None))]
#[allow(clippy::too_many_arguments)]
pub fn quantize_4bit(
    py: Python<'_>,
    data: &Bound<'_, PyAny>,
    dtype: &str,
    packed: &Bound<'_, PyAny>,
    absmax: &Bound<'_, PyAny>,
    quant_type: &str,
    blocksize: usize,
    threads: Option<usize>,
) -> PyResult<()> {
    let dtype = parse_dtype(dtype)?;
    let quant_type = parse_quant_type(quant_type)?;
    let threads = thread_count(threads);
    with_4bit_buffers(py, data, packed, absmax, |input, out, am| {
        quant::quantize_4bit(input, dtype, quant_type, blocksize, out, am, threads)
    })
}

/// The input, packed output and absmax of a 4-bit quantizer, held as buffers and
/// checked (C-contiguous, outputs writable, none sharing memory with another), as
/// slices to `kernel`, which runs without the GIL.
fn with_4bit_buffers<T: Element + Send, E: Into<PyErr> + Send>(
    py: Python<'_>,
    data: &Bound<'_, PyAny>,
    packed: &Bound<'_, PyAny>,
    absmax: &Bound<'_, PyAny>,
    kernel: impl FnOnce(&[u8], &mut [u8], &mut [T]) -> Result<(), E> + Send,
) -> PyResult<()> {
    let data_buf = PyBuffer::<u8>::get(data)?;
    let packed_buf = PyBuffer::<u8>::get(packed)?;
    let absmax_buf = PyBuffer::<T>::get(absmax)?;
    let (input, input_len) = contiguous(&data_buf, "data")?;
    let (out, out_len) = writable(&packed_buf, "packed")?;
    let (am, am_len) = writable(&absmax_buf, "absmax")?;
    check_disjoint(&[
        ("data", span(input, input_len)),
        ("packed", span(out, out_len)),
        ("absmax", span(am, am_len)),
    ])?;
    // SAFETY: the three buffers are held (not released) until this function
    // returns, are C-contiguous with these lengths, the outputs are writable,
    // and none overlaps another, so a shared and two exclusive slices are sound.
    let (input, out, am) = unsafe {
        (
            std::slice::from_raw_parts(input.cast_const(), input_len),
            std::slice::from_raw_parts_mut(out, out_len),
            std::slice::from_raw_parts_mut(am, am_len),
        )
    };
    py.detach(|| kernel(input, out, am)).map_err(Into::into)
}

/// Hold `packed` and `absmax` (writable, C-contiguous, disjoint) as the 4-bit
/// [`Outputs`] of `run`, which runs without the GIL.
pub(crate) fn with_4bit_outputs<R: Send>(
    py: Python<'_>,
    packed: &Bound<'_, PyAny>,
    absmax: &Bound<'_, PyAny>,
    quant_type: &str,
    blocksize: usize,
    run: impl FnOnce(Outputs<'_>) -> crate::error::Result<R> + Send,
) -> PyResult<R> {
    let quant_type = parse_quant_type(quant_type)?;
    let packed_buf = PyBuffer::<u8>::get(packed)?;
    let absmax_buf = PyBuffer::<f32>::get(absmax)?;
    let (out, out_len) = writable(&packed_buf, "packed")?;
    let (am, am_len) = writable(&absmax_buf, "absmax")?;
    check_disjoint(&[("packed", span(out, out_len)), ("absmax", span(am, am_len))])?;
    // SAFETY: both buffers are held until this function returns, are
    // C-contiguous and writable with these lengths, and do not overlap.
    let (packed, absmax) = unsafe {
        (
            std::slice::from_raw_parts_mut(out, out_len),
            std::slice::from_raw_parts_mut(am, am_len),
        )
    };
    let outputs = Outputs::FourBit {
        packed,
        absmax,
        quant_type,
        blocksize,
    };
    py.detach(|| run(outputs)).map_err(Into::into)
}

/// Hold `out` and `scb` (writable, C-contiguous, disjoint) as the int8
/// [`Outputs`] of `run` (rows of `cols` values), which runs without the GIL.
pub(crate) fn with_int8_outputs<R: Send>(
    py: Python<'_>,
    out: &Bound<'_, PyAny>,
    scb: &Bound<'_, PyAny>,
    cols: usize,
    run: impl FnOnce(Outputs<'_>) -> crate::error::Result<R> + Send,
) -> PyResult<R> {
    let out_buf = PyBuffer::<i8>::get(out)?;
    let scb_buf = PyBuffer::<f32>::get(scb)?;
    let (q, q_len) = writable(&out_buf, "out")?;
    let (s, s_len) = writable(&scb_buf, "scb")?;
    check_disjoint(&[("out", span(q, q_len)), ("scb", span(s, s_len))])?;
    if cols == 0 || q_len != s_len * cols {
        return Err(PyValueError::new_err(format!(
            "out holds {q_len} values, not one row of cols={cols} per statistic in scb ({s_len})"
        )));
    }
    // SAFETY: as in `with_4bit_outputs`.
    let (out, scb) = unsafe {
        (
            std::slice::from_raw_parts_mut(q, q_len),
            std::slice::from_raw_parts_mut(s, s_len),
        )
    };
    py.detach(|| run(Outputs::Int8 { out, scb, cols }))
        .map_err(Into::into)
}

/// LLM.int8 row-wise quantization, bit-identical to bitsandbytes' CPU
/// `Int8Params._quantize` (see `_core.pyi`).
#[pyfunction]
#[pyo3(signature = (data, dtype, cols, out, scb, *, threads = None))]
pub fn quantize_int8(
    py: Python<'_>,
    data: &Bound<'_, PyAny>,
    dtype: &str,
    cols: usize,
    out: &Bound<'_, PyAny>,
    scb: &Bound<'_, PyAny>,
    threads: Option<usize>,
) -> PyResult<()> {
    let dtype = parse_dtype(dtype)?;
    let data_buf = PyBuffer::<u8>::get(data)?;
    let out_buf = PyBuffer::<i8>::get(out)?;
    let scb_buf = PyBuffer::<f32>::get(scb)?;
    let (input, input_len) = contiguous(&data_buf, "data")?;
    let (q, q_len) = writable(&out_buf, "out")?;
    let (s, s_len) = writable(&scb_buf, "scb")?;
    check_disjoint(&[
        ("data", span(input, input_len)),
        ("out", span(q, q_len)),
        ("scb", span(s, s_len)),
    ])?;
    let threads = thread_count(threads);
    // SAFETY: as in `quantize_4bit`.
    let (input, q, s) = unsafe {
        (
            std::slice::from_raw_parts(input.cast_const(), input_len),
            std::slice::from_raw_parts_mut(q, q_len),
            std::slice::from_raw_parts_mut(s, s_len),
        )
    };
    py.detach(|| quant::quantize_int8(input, dtype, cols, q, s, threads))?;
    Ok(())
}

/// `(code, bounds, order)` of a 4-bit code book, as the quantizer uses it.
#[pyfunction]
pub fn codebook(quant_type: &str) -> PyResult<(Vec<f32>, Vec<f32>, Vec<u32>)> {
    let qt = parse_quant_type(quant_type)?;
    let order = qt.order().map(u32::from).to_vec();
    Ok((qt.code().to_vec(), qt.bounds().to_vec(), order))
}

/// Blockwise 4-bit quantization of a `[rows, cols]` weight straight into
/// bitsandbytes' AVX512-BF16 CPU layout (see `_core.pyi`).
#[pyfunction]
#[pyo3(signature = (
    data, dtype, packed, absmax, *, rows, cols, quant_type, blocksize, threads = None,
    absmax_layout = false,
))]
#[allow(clippy::too_many_arguments)]
pub fn quantize_4bit_cpu_layout(
    py: Python<'_>,
    data: &Bound<'_, PyAny>,
    dtype: &str,
    packed: &Bound<'_, PyAny>,
    absmax: &Bound<'_, PyAny>,
    rows: usize,
    cols: usize,
    quant_type: &str,
    blocksize: usize,
    threads: Option<usize>,
    absmax_layout: bool,
) -> PyResult<()> {
    let dtype = parse_dtype(dtype)?;
    let quant_type = parse_quant_type(quant_type)?;
    let threads = thread_count(threads);
    let quantize = |input: &[u8], out: &mut [u8], am: cpu_layout::Absmax<'_>| {
        cpu_layout::quantize_4bit_packed(
            input, dtype, quant_type, blocksize, rows, cols, out, am, threads,
        )
    };
    if absmax_layout {
        with_4bit_buffers::<u8, _>(py, data, packed, absmax, |input, out, am| {
            quantize(input, out, cpu_layout::Absmax::CpuLayout(am))
        })
    } else {
        with_4bit_buffers::<f32, _>(py, data, packed, absmax, |input, out, am| {
            quantize(input, out, cpu_layout::Absmax::Plain(am))
        })
    }
}

/// [`cpu_layout::pack`] or [`cpu_layout::unpack`].
type Relayout = fn(&[u8], usize, usize, &mut [u8], usize) -> Result<(), LayoutError>;

fn relayout(
    py: Python<'_>,
    src: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    rows: usize,
    cols: usize,
    threads: Option<usize>,
    convert: Relayout,
) -> PyResult<()> {
    let src_buf = PyBuffer::<u8>::get(src)?;
    let out_buf = PyBuffer::<u8>::get(out)?;
    let (input, input_len) = contiguous(&src_buf, "src")?;
    let (dst, dst_len) = writable(&out_buf, "out")?;
    check_disjoint(&[("src", span(input, input_len)), ("out", span(dst, dst_len))])?;
    let threads = thread_count(threads);
    // SAFETY: as in `quantize_4bit`: both buffers held, contiguous, disjoint.
    let (input, dst) = unsafe {
        (
            std::slice::from_raw_parts(input.cast_const(), input_len),
            std::slice::from_raw_parts_mut(dst, dst_len),
        )
    };
    py.detach(|| convert(input, rows, cols, dst, threads))?;
    Ok(())
}

/// Plain packed 4-bit bytes to bitsandbytes' CPU layout (see `_core.pyi`).
#[pyfunction]
#[pyo3(signature = (src, out, *, rows, cols, threads = None))]
pub fn pack_4bit_cpu_layout(
    py: Python<'_>,
    src: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    rows: usize,
    cols: usize,
    threads: Option<usize>,
) -> PyResult<()> {
    relayout(py, src, out, rows, cols, threads, cpu_layout::pack)
}

/// bitsandbytes' CPU layout back to plain packed 4-bit bytes (see `_core.pyi`).
#[pyfunction]
#[pyo3(signature = (src, out, *, rows, cols, threads = None))]
pub fn unpack_4bit_cpu_layout(
    py: Python<'_>,
    src: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    rows: usize,
    cols: usize,
    threads: Option<usize>,
) -> PyResult<()> {
    relayout(py, src, out, rows, cols, threads, cpu_layout::unpack)
}

/// Ask for transparent huge pages under a fresh output buffer before it is first written:
/// `madvise(MADV_HUGEPAGE)` on the 2 MiB-aligned part of it (see `_core.pyi`). Advisory:
/// False where the kernel refused or the buffer holds no aligned 2 MiB.
#[pyfunction]
pub fn advise_hugepages(py: Python<'_>, buffer: &Bound<'_, PyAny>) -> PyResult<bool> {
    const HUGE: usize = 2 << 20;
    let buf = PyBuffer::<u8>::get(buffer)?;
    let (ptr, len) = writable(&buf, "buffer")?;
    let start = (ptr as usize).next_multiple_of(HUGE);
    let end = (ptr as usize + len) / HUGE * HUGE;
    if end <= start {
        return Ok(false);
    }
    // SAFETY: advice on pages inside a writable buffer held for the call; it changes
    // how they are backed, never their contents
    let rc = py.detach(|| unsafe {
        libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE)
    });
    Ok(rc == 0)
}

/// bitsandbytes' CPU-layout `absmax` from the plain float32 one (see `_core.pyi`).
#[pyfunction]
#[pyo3(signature = (absmax, out, *, rows, per_row))]
pub fn absmax_to_cpu_layout(
    py: Python<'_>,
    absmax: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    rows: usize,
    per_row: usize,
) -> PyResult<()> {
    let absmax_buf = PyBuffer::<f32>::get(absmax)?;
    let out_buf = PyBuffer::<u8>::get(out)?;
    let (src, src_len) = contiguous(&absmax_buf, "absmax")?;
    let (dst, dst_len) = writable(&out_buf, "out")?;
    check_disjoint(&[("absmax", span(src, src_len)), ("out", span(dst, dst_len))])?;
    // SAFETY: as in `quantize_4bit`: both buffers held, contiguous, disjoint.
    let (src, dst) = unsafe {
        (
            std::slice::from_raw_parts(src.cast_const(), src_len),
            std::slice::from_raw_parts_mut(dst, dst_len),
        )
    };
    py.detach(|| cpu_layout::absmax_to_cpu_layout(src, rows, per_row, dst))?;
    Ok(())
}

/// A CPU-layout 4-bit weight dequantized, transposed, to bfloat16 (see `_core.pyi`).
#[pyfunction]
#[pyo3(signature = (packed, absmax, code, out, *, rows, cols, blocksize, threads = None))]
#[allow(clippy::too_many_arguments)]
pub fn dequantize_4bit_cpu_layout(
    py: Python<'_>,
    packed: &Bound<'_, PyAny>,
    absmax: &Bound<'_, PyAny>,
    code: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    rows: usize,
    cols: usize,
    blocksize: usize,
    threads: Option<usize>,
) -> PyResult<()> {
    let packed_buf = PyBuffer::<u8>::get(packed)?;
    let absmax_buf = PyBuffer::<u8>::get(absmax)?;
    let code_buf = PyBuffer::<f32>::get(code)?;
    let out_buf = PyBuffer::<u8>::get(out)?;
    let (src, src_len) = contiguous(&packed_buf, "packed")?;
    let (am, am_len) = contiguous(&absmax_buf, "absmax")?;
    let (book, book_len) = contiguous(&code_buf, "code")?;
    let (dst, dst_len) = writable(&out_buf, "out")?;
    check_disjoint(&[
        ("packed", span(src, src_len)),
        ("absmax", span(am, am_len)),
        ("code", span(book, book_len)),
        ("out", span(dst, dst_len)),
    ])?;
    let threads = threads.unwrap_or(1);
    // SAFETY: as in `quantize_4bit`: every buffer held, contiguous, the output disjoint.
    let (src, am, book, dst) = unsafe {
        (
            std::slice::from_raw_parts(src.cast_const(), src_len),
            std::slice::from_raw_parts(am.cast_const(), am_len),
            std::slice::from_raw_parts(book.cast_const(), book_len),
            std::slice::from_raw_parts_mut(dst, dst_len),
        )
    };
    py.detach(|| {
        cpu_layout::dequantize_transposed(src, am, book, rows, cols, blocksize, dst, threads)
    })?;
    Ok(())
}
