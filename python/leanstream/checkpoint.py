"""Where a checkpoint comes from: a local folder, or a Hugging Face hub repo.

Repo ids are resolved with ``huggingface_hub.snapshot_download`` restricted to
the files a load needs (configs, safetensors shards and index, tokenizer
files), so ``revision``, ``token``, ``cache_dir``, ``local_files_only`` and the
``HF_HUB_OFFLINE`` environment variable behave as everywhere in the HF stack.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
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


def resolve(
    source: str | os.PathLike[str],
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
) -> Path:
    """Return the local folder holding ``source``'s config and safetensors files.

    A path that exists is used as it is; anything else is taken as a hub repo id.
    """
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise checkpoint_error(
                FileNotFoundCheckpointError,
                f"{path}: expected a checkpoint folder (config.json + *.safetensors), got a file",
                file=str(path),
            )
        return path.resolve()
    repo_id = os.fspath(source)
    if repo_id.startswith(("/", ".", "~")) or repo_id.count("/") > 1:
        raise checkpoint_error(
            FileNotFoundCheckpointError, f"{repo_id}: no such folder", file=repo_id
        )

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            allow_patterns=HUB_PATTERNS,
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
    return Path(folder)


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


def read_config_dict(folder: Path) -> dict[str, Any]:
    """Parse ``config.json`` strictly: it must exist and be a JSON object with a model_type."""
    path = folder / "config.json"
    if path.exists() and not path.is_file():
        # a FIFO would block the read, a device (/dev/zero) never end it
        raise ConfigError(f"{path}: not a regular file")
    try:
        if path.stat().st_size > MAX_CONFIG_SIZE:
            raise ConfigError(f"{path}: larger than {MAX_CONFIG_SIZE} bytes: not a config")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing; a checkpoint folder needs its config.json") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: unreadable: {err}") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise ConfigError(f'{path}: not a transformers config (no "model_type" string)')
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


__all__ = ["HUB_PATTERNS", "check_weights_format", "load_config", "read_config_dict", "resolve"]
