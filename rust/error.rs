//! One error type for the whole reader, with the file and tensor it is about.
//!
//! [`Error`] is plain Rust (so `cargo test --no-default-features` needs no
//! libpython). With the `python` feature, [`py`] creates the Python exception
//! hierarchy of `leanstream._core` and converts an [`Error`] into the matching
//! class, with `file` and `tensor` set on the instance (polars' `error.rs` /
//! `exceptions.rs` pattern).

use std::fmt;
use std::path::{Path, PathBuf};

/// What went wrong; each kind is one Python exception class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The path, a shard named by the index, or any safetensors file is missing.
    FileNotFound,
    /// The file is shorter than 8 bytes, than its header says, or shrank (or
    /// was rewritten) after opening, possibly while its bytes were read.
    Truncated,
    /// The header length exceeds `MAX_HEADER_SIZE` or the file.
    HeaderTooLarge,
    /// Not UTF-8, not JSON, not an object, duplicate key, missing/mistyped field.
    InvalidHeader,
    /// A dtype string safetensors does not define.
    UnknownDtype,
    /// `prod(shape) * itemsize` overflows or differs from the byte length.
    Shape,
    /// `data_offsets` reversed, past the end of the file, leaving a gap in the
    /// data section (before the first tensor or between two), or an empty
    /// tensor inside another one.
    Offset,
    /// Two tensors of one shard share bytes.
    Overlap,
    /// Bytes after the last tensor's data (safetensors'
    /// `MetadataIncompleteBuffer`; where a polyglot file hides a second payload).
    TrailingData,
    /// The same tensor name in two shards.
    DuplicateTensor,
    /// `model.safetensors.index.json` is invalid or disagrees with the shards.
    IndexMismatch,
    /// A requested tensor name is not in the checkpoint.
    MissingTensor,
    /// A folder holds several checkpoints (variants such as `fp16`, or several
    /// indexes) and nothing says which one to open.
    Ambiguous,
    /// The download of a shard being streamed from the hub failed (its
    /// bytes will not all arrive, or they do not hash to the hub's sha256).
    Download,
    /// Any other I/O error (permissions, mmap failure, ...).
    Io,
    /// A broken invariant inside leanstream (poisoned lock, dead thread).
    Internal,
}

/// An error with the file and tensor it concerns.
///
/// `Display` prefixes the message with both, e.g.
/// `model-00002-of-00003.safetensors: tensor 'w': shape [2, 3] x BF16 needs 12 bytes but data_offsets give 10`.
#[derive(Debug, Clone)]
pub struct Error {
    pub kind: ErrorKind,
    pub file: Option<PathBuf>,
    pub tensor: Option<String>,
    pub message: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            file: None,
            tensor: None,
            message: message.into(),
        }
    }

    /// Attach the file (keeps a file that is already set: the innermost wins).
    pub fn in_file(mut self, file: &Path) -> Self {
        if self.file.is_none() {
            self.file = Some(file.to_path_buf());
        }
        self
    }

    /// Attach the tensor (keeps a tensor that is already set).
    pub fn for_tensor(mut self, tensor: &str) -> Self {
        if self.tensor.is_none() {
            self.tensor = Some(tensor.to_owned());
        }
        self
    }

    /// An I/O error on `file`; `NotFound` becomes [`ErrorKind::FileNotFound`].
    pub fn io(err: &std::io::Error, file: &Path, doing: &str) -> Self {
        let kind = if err.kind() == std::io::ErrorKind::NotFound {
            ErrorKind::FileNotFound
        } else {
            ErrorKind::Io
        };
        Error::new(kind, format!("cannot {doing}: {err}")).in_file(file)
    }

    /// A lock was poisoned or a thread died: a bug, reported instead of a panic.
    pub fn internal(what: &str) -> Self {
        Error::new(
            ErrorKind::Internal,
            format!("internal error: {what} (please report this as a leanstream bug)"),
        )
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}: ", file.display())?;
        }
        if let Some(tensor) = &self.tensor {
            write!(f, "tensor '{tensor}': ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

#[cfg(feature = "python")]
pub mod py {
    //! The Python exception hierarchy (see `_core.pyi`) and `Error -> PyErr`.

    use super::{Error, ErrorKind};
    use pyo3::exceptions::PyException;
    use pyo3::prelude::*;
    use pyo3::{create_exception, PyTypeInfo};

    create_exception!(
        leanstream._core,
        LeanstreamError,
        PyException,
        "Base class of every error leanstream raises."
    );
    create_exception!(
        leanstream._core,
        CheckpointError,
        LeanstreamError,
        "A checkpoint file or folder is malformed or inconsistent; `file` and `tensor` name them."
    );
    create_exception!(
        leanstream._core,
        FileNotFoundCheckpointError,
        CheckpointError,
        "The path, a shard named by the index, or any safetensors file is missing."
    );
    create_exception!(
        leanstream._core,
        TruncatedFileError,
        CheckpointError,
        "The file is shorter than its header says (or than 8 bytes), or shrank or was rewritten after it was opened (possibly while its bytes were read)."
    );
    create_exception!(
        leanstream._core,
        HeaderTooLargeError,
        CheckpointError,
        "The 8-byte header length exceeds MAX_HEADER_SIZE or the file."
    );
    create_exception!(
        leanstream._core,
        InvalidHeaderError,
        CheckpointError,
        "The header is not UTF-8, not JSON, not an object of tensor entries, has a duplicate key, or an entry lacks/mistypes a field."
    );
    create_exception!(
        leanstream._core,
        UnknownDtypeError,
        CheckpointError,
        "A tensor has a dtype string that safetensors does not define."
    );
    create_exception!(
        leanstream._core,
        ShapeError,
        CheckpointError,
        "prod(shape) * itemsize overflows or differs from the tensor's byte length."
    );
    create_exception!(
        leanstream._core,
        OffsetError,
        CheckpointError,
        "A tensor's data_offsets are reversed, point past the end of the file, leave a gap in the data section (before the first tensor or between two), or put an empty tensor inside another one."
    );
    create_exception!(
        leanstream._core,
        OverlapError,
        CheckpointError,
        "Two tensors of one shard share bytes."
    );
    create_exception!(
        leanstream._core,
        TrailingDataError,
        CheckpointError,
        "A shard has bytes after its last tensor's data, which no tensor describes (safetensors refuses such a file too: a polyglot file hides a second payload there)."
    );
    create_exception!(
        leanstream._core,
        DuplicateTensorError,
        CheckpointError,
        "The same tensor name appears in two shards."
    );
    create_exception!(
        leanstream._core,
        IndexMismatchError,
        CheckpointError,
        "model.safetensors.index.json is invalid or disagrees with the shards."
    );
    create_exception!(
        leanstream._core,
        MissingTensorError,
        CheckpointError,
        "A requested tensor name is not in the checkpoint."
    );
    create_exception!(
        leanstream._core,
        AmbiguousCheckpointError,
        CheckpointError,
        "A folder holds several checkpoints (variants such as fp16, or several indexes): open one index or file explicitly."
    );

    create_exception!(
        leanstream._core,
        DownloadError,
        CheckpointError,
        "A file streamed from the hub could not be downloaded completely and correctly (a server that keeps failing, bytes that do not hash to the hub's sha256, an interrupted load)."
    );

    /// Add every exception class to the module, and give `CheckpointError`
    /// class-level `file = tensor = None` so that instances raised from Python
    /// code have the attributes too.
    pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
        let py = m.py();
        let checkpoint_error = py.get_type::<CheckpointError>();
        checkpoint_error.setattr("file", py.None())?;
        checkpoint_error.setattr("tensor", py.None())?;
        m.add("LeanstreamError", py.get_type::<LeanstreamError>())?;
        m.add("CheckpointError", checkpoint_error)?;
        m.add(
            "FileNotFoundCheckpointError",
            py.get_type::<FileNotFoundCheckpointError>(),
        )?;
        m.add("TruncatedFileError", py.get_type::<TruncatedFileError>())?;
        m.add("HeaderTooLargeError", py.get_type::<HeaderTooLargeError>())?;
        m.add("InvalidHeaderError", py.get_type::<InvalidHeaderError>())?;
        m.add("UnknownDtypeError", py.get_type::<UnknownDtypeError>())?;
        m.add("ShapeError", py.get_type::<ShapeError>())?;
        m.add("OffsetError", py.get_type::<OffsetError>())?;
        m.add("OverlapError", py.get_type::<OverlapError>())?;
        m.add("TrailingDataError", py.get_type::<TrailingDataError>())?;
        m.add(
            "DuplicateTensorError",
            py.get_type::<DuplicateTensorError>(),
        )?;
        m.add("IndexMismatchError", py.get_type::<IndexMismatchError>())?;
        m.add("MissingTensorError", py.get_type::<MissingTensorError>())?;
        m.add(
            "AmbiguousCheckpointError",
            py.get_type::<AmbiguousCheckpointError>(),
        )?;
        m.add("DownloadError", py.get_type::<DownloadError>())?;
        Ok(())
    }

    fn new_err<T: PyTypeInfo>(py: Python<'_>, err: &Error) -> PyResult<PyErr> {
        let exc = PyErr::new::<T, _>(err.to_string());
        let value = exc.value(py);
        let file = err.file.as_ref().map(|f| f.display().to_string());
        value.setattr("file", file)?;
        value.setattr("tensor", err.tensor.as_deref())?;
        Ok(exc)
    }

    impl From<Error> for PyErr {
        fn from(err: Error) -> PyErr {
            Python::attach(|py| {
                let made = match err.kind {
                    ErrorKind::FileNotFound => new_err::<FileNotFoundCheckpointError>(py, &err),
                    ErrorKind::Truncated => new_err::<TruncatedFileError>(py, &err),
                    ErrorKind::HeaderTooLarge => new_err::<HeaderTooLargeError>(py, &err),
                    ErrorKind::InvalidHeader => new_err::<InvalidHeaderError>(py, &err),
                    ErrorKind::UnknownDtype => new_err::<UnknownDtypeError>(py, &err),
                    ErrorKind::Shape => new_err::<ShapeError>(py, &err),
                    ErrorKind::Offset => new_err::<OffsetError>(py, &err),
                    ErrorKind::Overlap => new_err::<OverlapError>(py, &err),
                    ErrorKind::TrailingData => new_err::<TrailingDataError>(py, &err),
                    ErrorKind::DuplicateTensor => new_err::<DuplicateTensorError>(py, &err),
                    ErrorKind::IndexMismatch => new_err::<IndexMismatchError>(py, &err),
                    ErrorKind::MissingTensor => new_err::<MissingTensorError>(py, &err),
                    ErrorKind::Ambiguous => new_err::<AmbiguousCheckpointError>(py, &err),
                    ErrorKind::Download => new_err::<DownloadError>(py, &err),
                    ErrorKind::Io => new_err::<CheckpointError>(py, &err),
                    ErrorKind::Internal => Ok(LeanstreamError::new_err(err.to_string())),
                };
                // Setting an attribute on a fresh exception cannot fail in
                // practice; if it does, raise that error rather than panic.
                made.unwrap_or_else(|e| e)
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_file_and_tensor() {
        let e = Error::new(ErrorKind::Shape, "bad")
            .for_tensor("w")
            .in_file(Path::new("a.safetensors"));
        assert_eq!(e.to_string(), "a.safetensors: tensor 'w': bad");
        let e = Error::new(ErrorKind::Io, "bad");
        assert_eq!(e.to_string(), "bad");
    }

    #[test]
    fn innermost_context_wins() {
        let e = Error::new(ErrorKind::Shape, "bad")
            .for_tensor("inner")
            .for_tensor("outer")
            .in_file(Path::new("inner.safetensors"))
            .in_file(Path::new("outer.safetensors"));
        assert_eq!(e.tensor.as_deref(), Some("inner"));
        assert_eq!(e.file.as_deref(), Some(Path::new("inner.safetensors")));
    }

    #[test]
    fn io_not_found_is_file_not_found() {
        let err = std::io::Error::from(std::io::ErrorKind::NotFound);
        let e = Error::io(&err, Path::new("x"), "open");
        assert_eq!(e.kind, ErrorKind::FileNotFound);
        let err = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        assert_eq!(Error::io(&err, Path::new("x"), "open").kind, ErrorKind::Io);
    }
}
