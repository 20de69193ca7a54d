"""Where a checkpoint comes from: a local folder, or a Hugging Face hub repo.

Repo ids are resolved with ``huggingface_hub.snapshot_download`` restricted to
the files a load needs (configs, safetensors shards and index, tokenizer
files), so ``revision``, ``token``, ``cache_dir``, ``local_files_only`` and the
``HF_HUB_OFFLINE`` environment variable behave as everywhere in the HF stack.
A ``subfolder`` (a diffusers pipeline's ``transformer``) fetches that folder only.

Inside a folder, :func:`weight_files` picks the weights of one variant, named as
transformers and diffusers name them (``_add_variant``): ``X.safetensors``,
``X-00001-of-00002.safetensors`` and the index ``X.safetensors.index.json``
without a variant; ``X.fp16.safetensors``, ``X.fp16-00001-of-00002.safetensors``
and ``X.safetensors.index.fp16.json`` for the variant ``fp16``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import (
    ConfigError,
    FileNotFoundCheckpointError,
    UnsupportedCheckpointError,
    checkpoint_error,
)

#: Files fetched from the hub for a load: never pickles, never other frameworks' weights.
HUB_PATTERNS = [
    "*.json",
    "*.safetensors",
    "tokenizer*",
    "*.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
]

_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")
#: Largest config.json read (real ones are a few KB; a larger one is not a config).
MAX_CONFIG_SIZE = 16 << 20
#: Deepest nesting of arrays and objects in a JSON file leanstream reads (config.json,
#: generation_config.json, model_index.json, a 4-bit quant state). Real ones nest a few
#: levels; a deep one would exhaust Python's recursion limit, in ``json`` or later in
#: transformers (``copy.deepcopy`` of the config).
MAX_JSON_DEPTH = 100

#: Single-file weights preferred over other files of the same variant (transformers', diffusers').
_MAIN_WEIGHTS = ("model", "diffusion_pytorch_model")
_SHARD_SUFFIX = re.compile(r"-[0-9]+-of-[0-9]+$")
_INDEX = re.compile(r"^.+\.safetensors\.index(?:\.(?P<variant>[^.]+))?\.json$")


def resolve(
    source: str | os.PathLike[str],
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    patterns: list[str] | None = None,
) -> Path:
    """Return the local folder holding ``source``'s config and safetensors files.

    ``patterns`` (default :data:`HUB_PATTERNS`) are the files fetched from the hub.

    A path that exists is used as it is; anything else is taken as a hub repo id.
    ``subfolder`` names a folder inside it (``"transformer"`` of a diffusers
    pipeline): the folder returned is that one, and from the hub only its files
    are fetched.

    >>> resolve("black-forest-labs/FLUX.1-dev", subfolder="transformer")  # doctest: +SKIP
    PosixPath('.../snapshots/<commit>/transformer')
    """
    sub = _subfolder(source, subfolder)
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise checkpoint_error(
                FileNotFoundCheckpointError,
                f"{path}: expected a checkpoint folder (config.json + *.safetensors), got a file",
                file=str(path),
            )
        return _inside(path.resolve(), sub, str(path))
    repo_id = os.fspath(source)
    if repo_id.startswith(("/", ".", "~")) or repo_id.count("/") > 1:
        raise checkpoint_error(
            FileNotFoundCheckpointError, f"{repo_id}: no such folder", file=repo_id
        )

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    patterns = patterns or HUB_PATTERNS
    patterns = [f"{sub}/{p}" for p in patterns] if sub else patterns
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            allow_patterns=patterns,
        )
    except LocalEntryNotFoundError as err:
        raise checkpoint_error(
            FileNotFoundCheckpointError,
            f"{repo_id}: not a local folder, and not in the Hugging Face cache "
            f"({cache_dir or 'default cache'}) while offline: {err}",
            file=repo_id,
        ) from err
    except HFValidationError as err:
        raise checkpoint_error(
            FileNotFoundCheckpointError,
            f"{repo_id}: no such folder, and not a valid hub repo id ({err})",
            file=repo_id,
        ) from err
    return _inside(Path(folder), sub, repo_id)


def _subfolder(source: str | os.PathLike[str], subfolder: str | None) -> str | None:
    """``subfolder`` as a relative POSIX path, refusing one that leaves the checkpoint."""
    if not subfolder:
        return None
    parts = PurePosixPath(subfolder).parts
    if PurePosixPath(subfolder).is_absolute() or ".." in parts:
        raise checkpoint_error(
            FileNotFoundCheckpointError,
            f"{source}: subfolder {subfolder!r} must be a relative path inside the checkpoint "
            "(no '..', not absolute)",
            file=os.fspath(source),
        )
    kept = [p for p in parts if p != "."]
    return "/".join(kept) or None


def _inside(folder: Path, sub: str | None, source: str) -> Path:
    """``folder / sub``, which must be a folder."""
    if sub is None:
        return folder
    path = folder / sub
    if not path.is_dir():
        raise checkpoint_error(
            FileNotFoundCheckpointError,
            f"{path}: no subfolder {sub!r} in {source}",
            file=str(path),
        )
    return path


def check_weights_format(folder: Path) -> None:
    """Refuse folders whose only weights are pickles, saying why (never unpickle)."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.name in _PICKLE_WEIGHTS)
    if pickles:
        raise checkpoint_error(
            UnsupportedCheckpointError,
            f"{folder}: only pickle weights ({', '.join(pickles)}); leanstream reads safetensors "
            "only, because unpickling a downloaded file can run arbitrary code. Convert it once "
            "with transformers (`model.save_pretrained(folder, safe_serialization=True)`) from "
            "a source you trust.",
            file=str(folder / pickles[0]),
        )


def variants(folder: Path) -> list[str | None]:
    """The variants of the weights in ``folder``: ``None`` (no variant) first, then by name.

    Both safetensors files and indexes count; other files do not.
    """
    return _variants(_weights([p.name for p in folder.iterdir() if p.is_file()]))


def weight_files(folder: Path, variant: str | None = None) -> Path | list[Path]:
    """What to open with ``_core.Checkpoint``: the weights of ``variant`` in ``folder``.

    An index of that variant (any ``*.safetensors.index.json``, e.g. diffusers'
    ``diffusion_pytorch_model.safetensors.index.json``) if there is one, else its
    ``model``/``diffusion_pytorch_model`` single file, else all its safetensors files.
    ``variant=None`` takes the only weights of a folder that holds one variant
    (``None``, the weights without one, or e.g. ``"fp16"``); a folder that holds
    several is a :class:`ConfigError` listing them. A folder without any safetensors
    file is returned as it is (the reader says what is missing).

    >>> weight_files(Path("unet"), variant="fp16")  # doctest: +SKIP
    PosixPath('unet/diffusion_pytorch_model.fp16.safetensors')
    """
    names = [p.name for p in folder.iterdir() if _weights_name(p.name) and p.is_file()]
    chosen = select_weights(names, variant, where=folder)
    if chosen is None:
        return folder
    if isinstance(chosen, str):
        return folder / chosen
    return [folder / name for name in chosen]


def select_weights(
    names: list[str], variant: str | None, *, where: Path | str
) -> str | list[str] | None:
    """:func:`weight_files` over file names (a folder's, or a hub repo's listing): the
    name of the index or single file to open, the names of the shards, or ``None``
    when there is no safetensors file or index at all. ``where`` names the folder or
    repo in errors."""
    found = _weights(names)
    present = _variants(found)
    if not present:
        return None
    if variant is None:
        if len(present) > 1:
            named = [v for v in present if v is not None]
            raise ConfigError(
                f"{where}: holds several variants of the weights ({_shown(present)}); pass "
                f"variant= to choose one (e.g. variant={named[0]!r})"
            )
        variant = present[0]
    if variant not in present:
        raise checkpoint_error(
            FileNotFoundCheckpointError,
            f"{where}: no weights of the variant {variant!r}; it holds {_shown(present)}",
            file=str(where),
        )
    indexes = sorted(n for is_index, v, n in found if is_index and v == variant)
    if len(indexes) > 1:
        raise ConfigError(
            f"{where}: several indexes of the same weights ("
            + ", ".join(indexes)
            + "); open one of them explicitly, or remove the others"
        )
    if indexes:
        return indexes[0]
    files = sorted(n for is_index, v, n in found if not is_index and v == variant)
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    main = [n for n in files if n in {m + suffix for m in _MAIN_WEIGHTS}]
    if len(main) == 1:
        return main[0]
    return files[0] if len(files) == 1 else files


def _weights_name(name: str) -> bool:
    return name.endswith(".safetensors") or _INDEX.match(name) is not None


def _weights(names: list[str]) -> list[tuple[bool, str | None, str]]:
    """``(is_index, variant, name)`` of every safetensors file and index among ``names``."""
    found = []
    for name in names:
        if name.endswith(".safetensors"):
            stem = _SHARD_SUFFIX.sub("", name.removesuffix(".safetensors"))
            prefix, _, variant = stem.rpartition(".")
            found.append((False, variant if prefix and variant else None, name))
        elif match := _INDEX.match(name):
            found.append((True, match["variant"], name))
    return found


def _variants(found: list[tuple[bool, str | None, str]]) -> list[str | None]:
    return sorted({variant for _, variant, _ in found}, key=lambda v: (v is not None, v or ""))


def _shown(present: list[str | None]) -> str:
    return ", ".join("no variant" if v is None else repr(v) for v in present)


def parse_json(text: str | bytes) -> Any:
    """``json.loads(text)``, refusing nesting deeper than :data:`MAX_JSON_DEPTH`; any
    failure is a ``ValueError`` saying what is wrong (for the caller to name the file)."""
    try:
        data = json.loads(text)
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"invalid JSON: {err}") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8: {err}") from err
    if _deeper_than(data, MAX_JSON_DEPTH):
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
    return data


def _deeper_than(data: Any, limit: int) -> bool:
    """Whether ``data``'s lists and dicts nest more than ``limit`` levels (no recursion)."""
    stack = [(data, 1)] if isinstance(data, dict | list) else []
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        items = value.values() if isinstance(value, dict) else value
        stack.extend((item, depth + 1) for item in items if isinstance(item, dict | list))
    return False


def read_json(path: Path, *, max_size: int = MAX_CONFIG_SIZE) -> Any:
    """Read and parse the JSON file ``path`` (see :func:`parse_json`); a file that is
    missing, not a regular file (a FIFO would block the read, a device never end it),
    larger than ``max_size`` bytes, unreadable or invalid is a :class:`ConfigError`
    naming it."""
    if path.exists() and not path.is_file():
        raise ConfigError(f"{path}: not a regular file")
    try:
        if path.stat().st_size > max_size:
            raise ConfigError(f"{path}: larger than {max_size} bytes: not a config")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: unreadable: {err}") from err
    try:
        return parse_json(text)
    except ValueError as err:
        raise ConfigError(f"{path}: {err}") from err


def read_config_dict(folder: Path) -> dict[str, Any]:
    """Parse ``config.json`` strictly (:func:`read_json`): it must exist and be a JSON
    object with a ``model_type`` (transformers) or, without one, a ``_class_name`` (a
    diffusers component, e.g. ``FluxTransformer2DModel``)."""
    path = folder / "config.json"
    if not path.exists() and not path.is_symlink():
        raise ConfigError(f"{path}: missing; a checkpoint folder needs its config.json")
    data = read_json(path)
    if not isinstance(data, dict) or not (
        isinstance(data.get("model_type"), str)
        or ("model_type" not in data and isinstance(data.get("_class_name"), str))
    ):
        raise ConfigError(
            f'{path}: not a transformers or diffusers config (no "model_type" or "_class_name" '
            "string)"
        )
    return data


def load_config(folder: Path, *, trust_remote_code: bool = False) -> Any:
    """Build the transformers config of ``folder`` (after :func:`read_config_dict`)."""
    from transformers import AutoConfig

    read_config_dict(folder)
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as err:  # whatever a hostile value makes the config class raise
        raise ConfigError(
            f"{folder / 'config.json'}: transformers cannot use it: {type(err).__name__}: {err}"
        ) from err


__all__ = [
    "HUB_PATTERNS",
    "MAX_JSON_DEPTH",
    "check_weights_format",
    "load_config",
    "parse_json",
    "read_config_dict",
    "read_json",
    "resolve",
    "select_weights",
    "variants",
    "weight_files",
]
