"""leanstream's exception hierarchy.

Byte-level errors are created by the Rust core (``leanstream._core``) and
re-exported here; model-level errors are defined here on top of them::

    LeanstreamError
    ├── CheckpointError                (.file, .tensor)
    │   ├── FileNotFoundCheckpointError, TruncatedFileError, HeaderTooLargeError,
    │   │   InvalidHeaderError, UnknownDtypeError, ShapeError, OffsetError,
    │   │   OverlapError, TrailingDataError, DuplicateTensorError,
    │   │   IndexMismatchError, MissingTensorError,
    │   │   AmbiguousCheckpointError, DownloadError           (raised by the Rust reader)
    │   ├── CorruptDownloadError        (a DownloadError: bytes that do not hash to the hub's)
    │   ├── UnsupportedCheckpointError  (pickle-only folders, merged-weight conversions)
    │   └── MismatchError               (.missing, .unexpected, .mismatched)
    ├── ConfigError                     (config.json missing/invalid, bad load() options)
    └── PlacementError                  (.names, .device: left off the target device)
"""

from __future__ import annotations

from collections.abc import Sequence

from ._core import (
    AmbiguousCheckpointError,
    CheckpointError,
    DownloadError,
    DuplicateTensorError,
    FileNotFoundCheckpointError,
    HeaderTooLargeError,
    IndexMismatchError,
    InvalidHeaderError,
    LeanstreamError,
    MissingTensorError,
    OffsetError,
    OverlapError,
    ShapeError,
    TrailingDataError,
    TruncatedFileError,
    UnknownDtypeError,
)


def _checkpoint_error_init(
    self: CheckpointError, message: str, *, file: str | None = None, tensor: str | None = None
) -> None:
    Exception.__init__(self, message)
    self.file = file
    self.tensor = tensor


def checkpoint_error(
    cls: type[CheckpointError], message: str, *, file: str | None = None, tensor: str | None = None
) -> CheckpointError:
    """Instantiate any :class:`CheckpointError` class (Rust-made ones included) with context."""
    err = cls(message)
    err.file = file
    err.tensor = tensor
    return err


class ConfigError(LeanstreamError):
    """``config.json`` is missing or invalid, or ``load()`` got options that cannot work."""


class CorruptDownloadError(DownloadError):
    """A file streamed from the hub does not hash to the sha256 (or git blob id) the hub
    lists for it: nothing of it is kept, and the load fails."""

    __init__ = _checkpoint_error_init


class UnsupportedCheckpointError(CheckpointError):
    """The checkpoint exists but cannot be streamed safely (e.g. pickle-only weights)."""

    __init__ = _checkpoint_error_init


class MismatchError(CheckpointError):
    """The checkpoint's tensors do not match the model built from ``config.json``.

    Like ``load_state_dict(strict=True)``: lists every missing tensor, every
    unexpected tensor and every shape mismatch, ``(name, checkpoint_shape,
    model_shape)``.
    """

    def __init__(
        self,
        folder: str,
        *,
        missing: Sequence[str] = (),
        unexpected: Sequence[str] = (),
        mismatched: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]] = (),
        file: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mismatched = sorted(mismatched)
        parts = []
        if self.missing:
            parts.append(f"missing from the checkpoint: {_names(self.missing)}")
        if self.unexpected:
            parts.append(f"in the checkpoint but not in the model: {_names(self.unexpected)}")
        if self.mismatched:
            shown = ", ".join(
                f"{name} (checkpoint {list(ckpt)}, model {list(model)})"
                for name, ckpt, model in self.mismatched[:10]
            )
            more = len(self.mismatched) - 10
            parts.append(f"shape mismatch: {shown}" + (f" and {more} more" if more > 0 else ""))
        first = (self.missing or self.unexpected or [m[0] for m in self.mismatched] or [None])[0]
        if hint:
            parts.append(hint)
        _checkpoint_error_init(
            self,
            f"{folder}: the checkpoint does not match the model; " + "; ".join(parts),
            file=file or folder,
            tensor=first,
        )


class PlacementError(LeanstreamError):
    """After a load, parameters or buffers are not on the target device.

    ``names`` lists them as ``"name (device)"``; ``device`` is the target (None: the
    ones a ``device_map`` planned). Raised
    instead of returning a model whose forward would copy them at every call,
    or fail.
    """

    def __init__(self, names: Sequence[str], device: object) -> None:
        self.names = list(names)
        self.device = device
        where = device if device is not None else "the device the device_map planned"
        super().__init__(
            f"after the load, {len(self.names)} parameter(s) or buffer(s) are not on "
            f"{where}: {_names(self.names)}"
        )


def _names(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


__all__ = [
    "AmbiguousCheckpointError",
    "CheckpointError",
    "ConfigError",
    "CorruptDownloadError",
    "DownloadError",
    "DuplicateTensorError",
    "FileNotFoundCheckpointError",
    "HeaderTooLargeError",
    "IndexMismatchError",
    "InvalidHeaderError",
    "LeanstreamError",
    "MismatchError",
    "MissingTensorError",
    "OffsetError",
    "OverlapError",
    "PlacementError",
    "ShapeError",
    "TrailingDataError",
    "TruncatedFileError",
    "UnknownDtypeError",
    "UnsupportedCheckpointError",
    "checkpoint_error",
]
