//! The PyO3 classes of `leanstream._core`: `Checkpoint`, `TensorStream`,
//! `TensorView`, `TensorInfo`, `TensorPipeline`, `Warmup`, `Arrival` (typed in
//! `python/leanstream/_core.pyi`).
//!
//! Every call that touches files (open, fstat, madvise) releases the GIL with
//! `py.detach`; the read-ahead thread never touches Python objects. Errors
//! become the exception classes of [`crate::error::py`].

use crate::arrival::Arrival;
use crate::error::Error;
use crate::pipeline::{Pipeline, SlotBuf, Warmup};
use crate::reader::{Checkpoint, TensorInfo, View, ARRIVAL_POLL};
use crate::stream::{Slot, Stream, DEFAULT_WINDOW};
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyBufferError, PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use std::ffi::{c_int, c_void};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

fn closed(what: &str) -> PyErr {
    PyValueError::new_err(format!("I/O operation on a closed {what}"))
}

fn poisoned() -> PyErr {
    Error::internal("lock poisoned").into()
}

/// Where one tensor lives: dtype, shape, file and absolute byte range.
#[pyclass(frozen, name = "TensorInfo", module = "leanstream._core")]
pub struct PyTensorInfo {
    info: TensorInfo,
    file: String,
}

#[pymethods]
impl PyTensorInfo {
    #[getter]
    fn name(&self) -> &str {
        &self.info.name
    }
    #[getter]
    fn dtype(&self) -> &'static str {
        self.info.dtype.as_str()
    }
    #[getter]
    fn shape<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.info.shape)
    }
    #[getter]
    fn file(&self) -> &str {
        &self.file
    }
    #[getter]
    fn start(&self) -> u64 {
        self.info.start
    }
    #[getter]
    fn end(&self) -> u64 {
        self.info.end
    }
    #[getter]
    fn nbytes(&self) -> u64 {
        self.info.nbytes()
    }
    fn __repr__(&self) -> String {
        format!(
            "TensorInfo(name={:?}, dtype={:?}, shape={:?}, file={:?}, start={}, end={})",
            self.info.name,
            self.info.dtype.as_str(),
            self.info.shape,
            self.file,
            self.info.start,
            self.info.end
        )
    }
}

/// A read-only, zero-copy view of one tensor's bytes (buffer protocol, format
/// `B`). It holds its shard's mapping (an `Arc`) alive; buffers exported from
/// it hold the view (`view.obj = self`), so the mapping outlives them all.
#[pyclass(frozen, name = "TensorView", module = "leanstream._core")]
pub struct PyTensorView {
    view: View,
    slot: Option<Slot>,
}

#[pymethods]
impl PyTensorView {
    #[getter]
    fn name(&self) -> &str {
        &self.view.info().name
    }
    #[getter]
    fn dtype(&self) -> &'static str {
        self.view.info().dtype.as_str()
    }
    #[getter]
    fn shape<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.view.info().shape)
    }
    #[getter]
    fn file(&self) -> String {
        self.view.path().display().to_string()
    }
    #[getter]
    fn nbytes(&self) -> u64 {
        self.view.info().nbytes()
    }
    fn __len__(&self) -> usize {
        self.view.len()
    }

    /// Drop the pages from the resident set and return the bytes to the
    /// stream's read-ahead budget. The view stays valid.
    fn release(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| match &self.slot {
            Some(slot) => slot.release(&self.view),
            None => {
                self.view.release();
                Ok(())
            }
        })?;
        Ok(())
    }

    /// Raise `TruncatedFileError` if the file shrank under this tensor while
    /// it was mapped (the lost bytes read as zeros instead of crashing with
    /// SIGBUS) or changed since it was opened. Call it after using the bytes.
    fn check(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.view.check())?;
        Ok(())
    }

    fn __repr__(&self) -> String {
        let info = self.view.info();
        format!(
            "TensorView(name={:?}, dtype={:?}, shape={:?}, nbytes={})",
            info.name,
            info.dtype.as_str(),
            info.shape,
            info.nbytes()
        )
    }

    /// Export the bytes read-only (tiktoken's `TiktokenBuffer`): refuse
    /// writable requests, fill format/shape/strides only when asked.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        if view.is_null() {
            return Err(PyBufferError::new_err("Py_buffer is null"));
        }
        if (flags & ffi::PyBUF_WRITABLE) == ffi::PyBUF_WRITABLE {
            return Err(PyBufferError::new_err(
                "TensorView is read-only: the checkpoint is mapped PROT_READ",
            ));
        }
        let bytes = slf.get().view.bytes();
        if !slf.get().view.arrived(0, bytes.len() as u64) {
            return Err(PyBufferError::new_err(
                "the tensor's bytes have not all been downloaded yet",
            ));
        }
        let (ptr, len) = (bytes.as_ptr(), bytes.len());
        let len = isize::try_from(len)
            .map_err(|_| PyBufferError::new_err("tensor too large for a buffer"))?;
        // SAFETY: `view` is non-null and CPython hands us a writable
        // Py_buffer. `bytes` lives in the mapping held by `slf`, and
        // `view.obj` keeps `slf` alive until the buffer is released.
        unsafe {
            (*view).obj = slf.into_any().into_ptr();
            (*view).buf = ptr as *mut c_void;
            (*view).len = len;
            (*view).readonly = 1;
            (*view).itemsize = 1;
            (*view).format = if (flags & ffi::PyBUF_FORMAT) == ffi::PyBUF_FORMAT {
                c"B".as_ptr().cast_mut()
            } else {
                std::ptr::null_mut()
            };
            (*view).ndim = 1;
            (*view).shape = if (flags & ffi::PyBUF_ND) == ffi::PyBUF_ND {
                &raw mut (*view).len
            } else {
                std::ptr::null_mut()
            };
            (*view).strides = if (flags & ffi::PyBUF_STRIDES) == ffi::PyBUF_STRIDES {
                &raw mut (*view).itemsize
            } else {
                std::ptr::null_mut()
            };
            (*view).suboffsets = std::ptr::null_mut();
            (*view).internal = std::ptr::null_mut();
        }
        Ok(())
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {
        // Nothing to free: the format string is static, shape/strides point
        // into the Py_buffer itself, and `view.obj` is released by CPython.
    }
}

/// Iterator over `(name, TensorView)` in the requested order, with a
/// read-ahead thread; see `Stream`.
#[pyclass(frozen, name = "TensorStream", module = "leanstream._core")]
pub struct PyTensorStream {
    stream: Mutex<Stream>,
    window: u64,
    total_bytes: u64,
}

#[pymethods]
impl PyTensorStream {
    #[getter]
    fn window(&self) -> u64 {
        self.window
    }
    #[getter]
    fn total_bytes(&self) -> u64 {
        self.total_bytes
    }
    fn __iter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }
    fn __next__(&self, py: Python<'_>) -> PyResult<Option<(String, PyTensorView)>> {
        let next = py.detach(|| {
            let mut stream = self.stream.lock().map_err(|_| poisoned())?;
            Ok::<_, PyErr>(stream.next())
        })?;
        match next {
            None => Ok(None),
            Some(Err(e)) => Err(e.into()),
            Some(Ok((view, slot))) => {
                wait_arrived(py, &view)?;
                let name = view.info().name.clone();
                Ok(Some((
                    name,
                    PyTensorView {
                        view,
                        slot: Some(slot),
                    },
                )))
            }
        }
    }
    fn __len__(&self) -> PyResult<usize> {
        Ok(self.stream.lock().map_err(|_| poisoned())?.remaining())
    }

    /// Quantize the stream's next `len(keys)` tensors (named `keys`, in order)
    /// to 4 bits into `packed`/`absmax`, tensor `i` at value `firsts[i]` of the
    /// flattened output, on `threads` threads, each tensor's pages released
    /// once done; checked after use. Returns the bytes read. See `pieces`.
    #[pyo3(signature = (keys, firsts, packed, absmax, *, quant_type, blocksize, threads = None))]
    #[allow(clippy::too_many_arguments)]
    fn quantize_4bit_next(
        &self,
        py: Python<'_>,
        keys: Vec<String>,
        firsts: Vec<usize>,
        packed: &Bound<'_, PyAny>,
        absmax: &Bound<'_, PyAny>,
        quant_type: &str,
        blocksize: usize,
        threads: Option<usize>,
    ) -> PyResult<u64> {
        let threads = threads.unwrap_or(1);
        crate::py_quant::with_4bit_outputs(py, packed, absmax, quant_type, blocksize, |out| {
            self.quantize_next(&keys, &firsts, out, threads)
        })
    }

    /// `quantize_4bit_next` for LLM.int8: tensor `i` goes to rows
    /// `first_rows[i]...` of `out` (rows of `cols` values) and `scb`.
    #[pyo3(signature = (keys, first_rows, cols, out, scb, *, threads = None))]
    #[allow(clippy::too_many_arguments)]
    fn quantize_int8_next(
        &self,
        py: Python<'_>,
        keys: Vec<String>,
        first_rows: Vec<usize>,
        cols: usize,
        out: &Bound<'_, PyAny>,
        scb: &Bound<'_, PyAny>,
        threads: Option<usize>,
    ) -> PyResult<u64> {
        let threads = threads.unwrap_or(1);
        let firsts = first_rows
            .iter()
            .map(|r| r.checked_mul(cols))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| PyValueError::new_err("first_rows * cols overflows"))?;
        crate::py_quant::with_int8_outputs(py, out, scb, cols, |out| {
            self.quantize_next(&keys, &firsts, out, threads)
        })
    }

    /// Check the views yielded since the last check, after their bytes were
    /// used (`TensorView.check`); `__next__` checks the previous view too.
    fn check(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| {
            let mut stream = self.stream.lock().map_err(|_| poisoned())?;
            stream.check().map_err(PyErr::from)
        })
    }

    /// Stop and join the read-ahead thread. Views already yielded stay valid.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| {
            let mut stream = self.stream.lock().map_err(|_| poisoned())?;
            stream.close().map_err(PyErr::from)
        })
    }
    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }
    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, PyTuple>) -> PyResult<()> {
        self.close(py)
    }
    fn __repr__(&self) -> String {
        let remaining = self.stream.lock().map(|s| s.remaining()).unwrap_or(0);
        format!(
            "TensorStream(remaining={remaining}, total_bytes={}, window={})",
            self.total_bytes, self.window
        )
    }
}

impl PyTensorStream {
    /// Take the next `keys.len()` views (they must be `keys`), quantize them
    /// into `out` ([`crate::pieces::quantize_views`]), check them after use.
    fn quantize_next(
        &self,
        keys: &[String],
        firsts: &[usize],
        out: crate::pieces::Outputs<'_>,
        threads: usize,
    ) -> crate::error::Result<u64> {
        let items = self
            .stream
            .lock()
            .map_err(|_| Error::internal("stream lock poisoned"))?
            .next_many(keys.len())?;
        let result = if items
            .iter()
            .zip(keys)
            .any(|((v, _), k)| v.info().name != *k)
        {
            Err(Error::internal(
                "the stream's next tensors are not the ones named",
            ))
        } else {
            crate::pieces::quantize_views(&items, firsts, out, threads)
        };
        if result.is_err() {
            for (view, slot) in &items {
                slot.release(view)?;
            }
        }
        result?;
        self.stream
            .lock()
            .map_err(|_| Error::internal("stream lock poisoned"))?
            .check()?;
        Ok(items.iter().map(|(v, _)| v.info().nbytes()).sum())
    }
}

/// Wait (without the GIL) until all of `view`'s bytes have been downloaded,
/// checking for signals between short sleeps so Ctrl-C interrupts the wait.
fn wait_arrived(py: Python<'_>, view: &View) -> PyResult<()> {
    let len = view.info().nbytes();
    loop {
        if py.detach(|| view.wait_arrived(0, len, Some(ARRIVAL_POLL)))? {
            return Ok(());
        }
        py.check_signals()?;
    }
}

/// Which bytes of a file being downloaded have arrived; see `Arrival`.
#[pyclass(frozen, name = "Arrival", module = "leanstream._core")]
pub struct PyArrival {
    inner: Arc<Arrival>,
}

#[pymethods]
impl PyArrival {
    #[new]
    fn new(length: u64) -> Self {
        PyArrival {
            inner: Arc::new(Arrival::new(length)),
        }
    }

    /// The file's length in bytes.
    #[getter]
    fn length(&self) -> u64 {
        self.inner.len()
    }

    /// Bytes arrived so far.
    #[getter]
    fn arrived(&self) -> u64 {
        self.inner.arrived()
    }

    /// The failure reported with `fail`, or None.
    #[getter]
    fn failure(&self) -> Option<String> {
        self.inner.failure()
    }

    /// Bytes `[start, end)` were written to the file.
    fn add(&self, start: u64, end: u64) {
        self.inner.add(start, end);
    }

    /// Whether all of `[start, end)` has arrived.
    fn covers(&self, start: u64, end: u64) -> bool {
        self.inner.covers(start, end)
    }

    /// Where the bytes arrived from the start of the file end.
    #[getter]
    fn contiguous(&self) -> u64 {
        self.inner.contiguous()
    }

    /// The arrived ranges `(start, end)`, sorted and merged.
    fn ranges(&self) -> Vec<(u64, u64)> {
        self.inner.ranges()
    }

    /// The parts of `[start, end)` that have not arrived, in order.
    fn missing(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        self.inner.missing(start, end)
    }

    /// The download failed: every wait for this file's bytes fails with `message`.
    fn fail(&self, message: &str) {
        self.inner.fail(message);
    }

    fn __repr__(&self) -> String {
        format!(
            "Arrival(length={}, arrived={}{})",
            self.inner.len(),
            self.inner.arrived(),
            if self.inner.failure().is_some() {
                ", failed"
            } else {
                ""
            }
        )
    }
}

/// `(seq, item, offset, nbytes, slot)`, as `TensorPipeline` yields it.
type ChunkTuple = (usize, usize, u64, u64, usize);

/// Chunks of tensors read by Rust worker threads into a ring of caller-owned
/// writable buffers; see `Pipeline`. Yields `(seq, item, offset, nbytes,
/// slot)` tuples; `release(seq)` hands a slot back.
#[pyclass(frozen, name = "TensorPipeline", module = "leanstream._core")]
pub struct PyTensorPipeline {
    // Declared (so dropped) before `slots_held`: the workers are joined before
    // the buffers they write into are let go.
    pipeline: Mutex<Pipeline>,
    // The ring's buffers, let go by `close` once the workers are joined: the
    // caller's (pinned) memory is not kept alive by a closed pipeline.
    slots_held: Mutex<Vec<PyBuffer<u8>>>,
    total_bytes: u64,
    slot_bytes: usize,
    slots: usize,
    chunks: usize,
}

#[pymethods]
impl PyTensorPipeline {
    #[getter]
    fn total_bytes(&self) -> u64 {
        self.total_bytes
    }
    /// Length of a chunk (the smallest slot's length).
    #[getter]
    fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }
    #[getter]
    fn slots(&self) -> usize {
        self.slots
    }
    /// Number of chunks in all.
    #[getter]
    fn chunks(&self) -> usize {
        self.chunks
    }
    #[getter]
    fn bytes_read(&self) -> PyResult<u64> {
        let pipeline = self.pipeline.lock().map_err(|_| poisoned())?;
        Ok(pipeline.stats()?.bytes_read)
    }
    fn __iter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }
    fn __next__(&self, py: Python<'_>) -> PyResult<Option<ChunkTuple>> {
        let next = py.detach(|| {
            let mut pipeline = self.pipeline.lock().map_err(|_| poisoned())?;
            Ok::<_, PyErr>(pipeline.next())
        })?;
        match next {
            None => Ok(None),
            Some(Err(e)) => Err(e.into()),
            Some(Ok(c)) => Ok(Some((c.seq, c.item, c.offset, c.len, c.slot))),
        }
    }
    fn __len__(&self) -> PyResult<usize> {
        Ok(self.pipeline.lock().map_err(|_| poisoned())?.remaining())
    }
    /// Let chunk `seq`'s slot be overwritten: its bytes were consumed (on a
    /// GPU: the copy out of it finished).
    fn release(&self, py: Python<'_>, seq: usize) -> PyResult<()> {
        // detached: another thread may hold the lock inside `__next__`, waiting
        // for a read to finish
        py.detach(|| {
            let mut pipeline = self.pipeline.lock().map_err(|_| poisoned())?;
            pipeline.release(seq).map_err(PyErr::from)
        })
    }
    /// Stop and join the worker threads, then let go of the ring's buffers; no
    /// slot is written after this.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let closed = py.detach(|| {
            let mut pipeline = self.pipeline.lock().map_err(|_| poisoned())?;
            pipeline.close().map_err(PyErr::from)
        });
        if closed.is_ok() {
            // every worker is joined: nothing writes into the buffers any more
            drop(std::mem::take(
                &mut *self.slots_held.lock().map_err(|_| poisoned())?,
            ));
        }
        closed
    }
    /// Whether a worker thread is still running.
    #[getter]
    fn threads_alive(&self) -> PyResult<bool> {
        Ok(self
            .pipeline
            .lock()
            .map_err(|_| poisoned())?
            .threads_alive())
    }
    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }
    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, PyTuple>) -> PyResult<()> {
        self.close(py)
    }
    fn __repr__(&self) -> String {
        format!(
            "TensorPipeline(chunks={}, slots={}, slot_bytes={}, total_bytes={})",
            self.chunks, self.slots, self.slot_bytes, self.total_bytes
        )
    }
}

/// A thread reading tensors into the page cache ahead of time; see `Warmup`.
#[pyclass(frozen, name = "Warmup", module = "leanstream._core")]
pub struct PyWarmup {
    warmup: Mutex<Warmup>,
}

#[pymethods]
impl PyWarmup {
    #[getter]
    fn bytes_read(&self) -> PyResult<u64> {
        Ok(self.warmup.lock().map_err(|_| poisoned())?.bytes_read())
    }
    #[getter]
    fn running(&self) -> PyResult<bool> {
        Ok(self.warmup.lock().map_err(|_| poisoned())?.is_running())
    }
    /// Stop (after the read in progress) and join; returns the bytes read.
    fn stop(&self, py: Python<'_>) -> PyResult<u64> {
        py.detach(|| Ok(self.warmup.lock().map_err(|_| poisoned())?.stop()))
    }
    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }
    /// Stops the thread; never suppresses the exception in flight.
    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, PyTuple>) -> PyResult<()> {
        self.stop(py).map(|_| ())
    }
}

/// One safetensors checkpoint, validated completely on open.
#[pyclass(frozen, name = "Checkpoint", module = "leanstream._core")]
pub struct PyCheckpoint {
    inner: RwLock<Option<Arc<Checkpoint>>>,
}

impl PyCheckpoint {
    fn get(&self) -> PyResult<Arc<Checkpoint>> {
        let guard = self.inner.read().map_err(|_| poisoned())?;
        guard.clone().ok_or_else(|| closed("Checkpoint"))
    }

    fn info(ckpt: &Checkpoint, name: &str) -> PyResult<PyTensorInfo> {
        let info = ckpt.get(name).ok_or_else(|| ckpt.missing(name))?;
        Ok(PyTensorInfo {
            info: info.clone(),
            file: ckpt.shard_path(info).display().to_string(),
        })
    }
}

#[pymethods]
impl PyCheckpoint {
    #[new]
    #[pyo3(signature = (path, *, arrivals = None))]
    fn new(
        py: Python<'_>,
        path: &Bound<'_, PyAny>,
        arrivals: Option<Vec<(PathBuf, Bound<'_, PyArrival>)>>,
    ) -> PyResult<Self> {
        let mut ckpt = if let Ok(path) = path.extract::<PathBuf>() {
            py.detach(|| Checkpoint::open(&path))?
        } else if let Ok(paths) = path.extract::<Vec<PathBuf>>() {
            py.detach(|| Checkpoint::open_files(&paths))?
        } else {
            return Err(PyTypeError::new_err(format!(
                "Checkpoint() takes a path (str or os.PathLike) or a sequence of paths, not {}",
                path.get_type().name()?
            )));
        };
        if let Some(arrivals) = arrivals {
            let arrivals = arrivals
                .into_iter()
                .map(|(path, arrival)| (path, Arc::clone(&arrival.get().inner)))
                .collect();
            ckpt.attach_arrivals(arrivals)?;
        }
        Ok(PyCheckpoint {
            inner: RwLock::new(Some(Arc::new(ckpt))),
        })
    }

    #[getter]
    fn files(&self) -> PyResult<Vec<String>> {
        let ckpt = self.get()?;
        Ok(ckpt.files().map(|p| p.display().to_string()).collect())
    }

    #[getter]
    fn metadata<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let ckpt = self.get()?;
        let dict = PyDict::new(py);
        for (k, v) in ckpt.metadata() {
            dict.set_item(k, v)?;
        }
        Ok(dict)
    }

    #[getter]
    fn index_metadata<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let ckpt = self.get()?;
        let Some(value) = ckpt.index_metadata() else {
            return Ok(None);
        };
        let text = serde_json::to_string(value)
            .map_err(|e| PyValueError::new_err(format!("cannot re-encode index metadata: {e}")))?;
        Ok(Some(py.import("json")?.call_method1("loads", (text,))?))
    }

    #[getter]
    fn total_bytes(&self) -> PyResult<u64> {
        Ok(self.get()?.total_bytes())
    }

    /// All tensor names, sorted.
    fn keys(&self) -> PyResult<Vec<String>> {
        Ok(self.get()?.names().map(str::to_owned).collect())
    }

    fn __len__(&self) -> PyResult<usize> {
        Ok(self.get()?.len())
    }

    fn __contains__(&self, name: &Bound<'_, PyAny>) -> PyResult<bool> {
        let ckpt = self.get()?;
        Ok(match name.extract::<&str>() {
            Ok(name) => ckpt.get(name).is_some(),
            Err(_) => false,
        })
    }

    fn __getitem__(&self, name: &str) -> PyResult<PyTensorInfo> {
        let ckpt = self.get()?;
        Self::info(&ckpt, name)
    }

    /// Random access to one tensor, without read-ahead.
    fn view(&self, py: Python<'_>, name: &str) -> PyResult<PyTensorView> {
        let ckpt = self.get()?;
        let view = py.detach(|| {
            let view = ckpt.view(name)?;
            view.check_available()?;
            Ok::<_, Error>(view)
        })?;
        wait_arrived(py, &view)?;
        Ok(PyTensorView { view, slot: None })
    }

    /// Yield the named tensors in this order (duplicates allowed).
    #[pyo3(signature = (names, *, window = DEFAULT_WINDOW as i64))]
    fn stream(&self, py: Python<'_>, names: Vec<String>, window: i64) -> PyResult<PyTensorStream> {
        let window = u64::try_from(window)
            .ok()
            .filter(|&w| w > 0)
            .ok_or_else(|| {
                PyValueError::new_err(format!(
                    "window must be a positive byte count, not {window}"
                ))
            })?;
        let ckpt = self.get()?;
        let stream = py.detach(|| Stream::new(ckpt.views(&names)?, window))?;
        Ok(PyTensorStream {
            total_bytes: stream.total_bytes(),
            window,
            stream: Mutex::new(stream),
        })
    }

    /// Read the named tensors, in this order, in chunks into `slots` (writable
    /// C-contiguous byte buffers, e.g. numpy views of pinned torch tensors)
    /// with `threads` worker threads.
    #[pyo3(signature = (names, slots, *, threads = 4))]
    fn pipeline(
        &self,
        py: Python<'_>,
        names: Vec<String>,
        slots: Vec<Bound<'_, PyAny>>,
        threads: usize,
    ) -> PyResult<PyTensorPipeline> {
        let ckpt = self.get()?;
        let views = ckpt.views(&names)?;
        let mut buffers = Vec::with_capacity(slots.len());
        let mut ring = Vec::with_capacity(slots.len());
        for (i, slot) in slots.iter().enumerate() {
            let buffer = PyBuffer::<u8>::get(slot)?;
            let (ptr, len) = crate::py_quant::writable(&buffer, &format!("slot {i}"))?;
            // SAFETY: `buffer` keeps the exporter's memory alive and is held
            // by the returned object, whose pipeline (declared first) joins its
            // workers before the buffers are released.
            ring.push(unsafe { SlotBuf::new(ptr, len) });
            buffers.push(buffer);
        }
        if ring.is_empty() || ring.iter().any(SlotBuf::is_empty) {
            return Err(PyValueError::new_err(
                "pipeline() needs at least one slot, and no empty slot",
            ));
        }
        // SAFETY: see above; the Python side reads a slot only between the
        // chunk being yielded and released.
        let pipeline = py.detach(|| unsafe { Pipeline::new(views, ring, threads) })?;
        Ok(PyTensorPipeline {
            total_bytes: pipeline.total_bytes(),
            slot_bytes: pipeline.slot_len(),
            slots: pipeline.slots(),
            chunks: pipeline.chunks().len(),
            pipeline: Mutex::new(pipeline),
            slots_held: Mutex::new(buffers),
        })
    }

    /// Start reading the named tensors, in this order, into the page cache in
    /// a background thread, up to `budget` bytes (default: all).
    #[pyo3(signature = (names, *, budget = None))]
    fn warm(&self, names: Vec<String>, budget: Option<u64>) -> PyResult<PyWarmup> {
        let ckpt = self.get()?;
        let warmup = Warmup::start(ckpt.views(&names)?, budget.unwrap_or(u64::MAX))?;
        Ok(PyWarmup {
            warmup: Mutex::new(warmup),
        })
    }

    /// Drop this object's mappings (live views keep theirs).
    fn close(&self) -> PyResult<()> {
        *self.inner.write().map_err(|_| poisoned())? = None;
        Ok(())
    }
    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }
    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, _exc: &Bound<'_, PyTuple>) -> PyResult<()> {
        self.close()
    }
    fn __repr__(&self) -> String {
        match self.get() {
            Ok(ckpt) => format!(
                "Checkpoint({} tensors, {} files, {} bytes)",
                ckpt.len(),
                ckpt.files().count(),
                ckpt.total_bytes()
            ),
            Err(_) => "Checkpoint(closed)".to_owned(),
        }
    }
}
