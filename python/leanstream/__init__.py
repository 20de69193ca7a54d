"""leanstream: stream a safetensors checkpoint straight into a bitsandbytes-quantized model.

>>> import leanstream
>>> model = leanstream.load("meta-llama/Llama-3.2-1B-Instruct", bits=4)  # doctest: +SKIP
"""

import sys as _sys
import types as _types
from typing import TYPE_CHECKING, Any

from ._core import Checkpoint, __version__
from .errors import (
    AmbiguousCheckpointError,
    CheckpointError,
    ConfigError,
    CorruptDownloadError,
    DownloadError,
    DuplicateTensorError,
    FileNotFoundCheckpointError,
    HeaderTooLargeError,
    IndexMismatchError,
    InvalidHeaderError,
    LeanstreamError,
    MismatchError,
    MissingTensorError,
    OffsetError,
    OverlapError,
    PlacementError,
    ShapeError,
    TrailingDataError,
    TruncatedFileError,
    UnknownDtypeError,
    UnsupportedCheckpointError,
)

if TYPE_CHECKING:
    from .footprint import Footprint, footprint
    from .loader import load, load_into
    from .meta import empty_parameters
    from .save import save

#: imported on first use: they import torch, which takes seconds, so ``import leanstream``
#: (and the command line, which catches Ctrl-C only once it runs) does not
_LAZY = {
    "Footprint": "footprint",
    "empty_parameters": "meta",
    "footprint": "footprint",
    "load": "loader",
    "load_into": "loader",
    "save": "save",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


class _Package(_types.ModuleType):
    """Importing the submodule ``leanstream.save`` (or ``.footprint``) must not hide the
    function of the same name, as the import system's ``setattr`` on the package would."""

    def __setattr__(self, name: str, value: Any) -> None:
        if not (name in _LAZY and isinstance(value, _types.ModuleType)):
            super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package

__all__ = [
    "AmbiguousCheckpointError",
    "Checkpoint",
    "CheckpointError",
    "ConfigError",
    "CorruptDownloadError",
    "DownloadError",
    "DuplicateTensorError",
    "FileNotFoundCheckpointError",
    "Footprint",
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
    "__version__",
    "empty_parameters",
    "footprint",
    "load",
    "load_into",
    "save",
]
