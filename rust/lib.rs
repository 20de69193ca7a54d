//! leanstream's Rust core: bytes only. It parses and validates safetensors
//! headers ([`header`]), maps shards and indexes tensors ([`reader`]), and
//! streams zero-copy views with bounded read-ahead ([`stream`]), and quantizes
//! tensors' bytes to NF4/FP4/int8 like bitsandbytes ([`quant`]), many small
//! tensors of a stream at once ([`pieces`]: a mixture of experts' thousands),
//! straight into bitsandbytes' AVX512-BF16 CPU layout when asked ([`cpu_layout`]), and reads
//! tensors in chunks into a ring of caller-owned buffers with worker threads
//! ([`pipeline`], the host side of the overlapped GPU load). The PyO3
//! binding (`py`, feature `python`) exposes them as `leanstream._core`.

pub mod arrival;
pub mod cpu_layout;
pub mod error;
pub mod fault;
pub mod header;
pub mod pieces;
pub mod pipeline;
#[cfg(feature = "python")]
mod py;
#[cfg(feature = "python")]
mod py_quant;
pub mod quant;
pub mod reader;
pub mod stream;

#[cfg(feature = "python")]
use pyo3::prelude::*;

/// The Rust reader of safetensors checkpoints (see `_core.pyi`).
#[cfg(feature = "python")]
#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("DEFAULT_WINDOW", stream::DEFAULT_WINDOW)?;
    m.add("MAX_HEADER_SIZE", header::MAX_HEADER_SIZE)?;
    m.add("MAX_INDEX_SIZE", reader::MAX_INDEX_SIZE)?;
    error::py::register(m)?;
    m.add_class::<py::PyCheckpoint>()?;
    m.add_class::<py::PyTensorStream>()?;
    m.add_class::<py::PyTensorView>()?;
    m.add_class::<py::PyTensorInfo>()?;
    m.add_class::<py::PyTensorPipeline>()?;
    m.add_class::<py::PyWarmup>()?;
    m.add_class::<py::PyArrival>()?;
    m.add_function(wrap_pyfunction!(py_quant::quantize_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(py_quant::quantize_int8, m)?)?;
    m.add_function(wrap_pyfunction!(py_quant::codebook, m)?)?;
    m.add_function(wrap_pyfunction!(py_quant::quantize_4bit_cpu_layout, m)?)?;
    m.add_function(wrap_pyfunction!(py_quant::pack_4bit_cpu_layout, m)?)?;
    m.add_function(wrap_pyfunction!(py_quant::unpack_4bit_cpu_layout, m)?)?;
    m.add_function(wrap_pyfunction!(py_quant::advise_hugepages, m)?)?;
    m.add_function(wrap_pyfunction!(py_quant::absmax_to_cpu_layout, m)?)?;
    m.add_function(wrap_pyfunction!(py_quant::dequantize_4bit_cpu_layout, m)?)?;
    Ok(())
}
