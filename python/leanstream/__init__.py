"""leanstream: stream a safetensors checkpoint straight into a bitsandbytes-quantized model.

>>> import leanstream
>>> model = leanstream.load("meta-llama/Llama-3.2-1B-Instruct", bits=4)  # doctest: +SKIP
"""

from ._core import Checkpoint, __version__
from .errors import (
    CheckpointError,
    ConfigError,
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
from .footprint import Footprint, footprint
from .loader import load
from .save import save

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "ConfigError",
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
    "footprint",
    "load",
    "save",
]
