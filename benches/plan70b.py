"""The plan ``leanstream inspect`` prints for Llama-3-70B on two 24 GB GPUs, without its weights.

    PYTHONPATH=python python benches/plan70b.py [--dir DIR]

``leanstream inspect`` reads shard headers and builds the model on ``meta``, so it can plan
a 70B model without its 141 GB of weights. This script writes a header-only checkpoint of
Llama-3-70B's shapes (hidden 8192, intermediate 28672, 80 layers, 64 heads, 8 key/value
heads, vocabulary 128256, rope_theta 500000, bfloat16, untied ``lm_head``): safetensors shards
whose headers list every tensor as transformers names and shards them
(``model-00001-of-000NN.safetensors``, 5 GB each as the published repo's, and
``model.safetensors.index.json``), and whose data sections are sparse holes (each file is
truncated to its full size; not a byte of data is written), with ``config.json``. It then
runs ``leanstream inspect`` on it in a fresh process, for each plan below, prints the
commands and their output, and deletes the folder.

It also checks that ``inspect`` reads no tensor data: with ``mincore``, it counts the pages
of each shard held in the page cache before and after the runs (reading a hole of an ext4
file caches a zero page); then touches one byte of one tensor and counts again, to show the
count would have seen a read. These are plans, not measurements: nothing runs on a GPU.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

#: Llama-3-70B's shapes (meta-llama/Meta-Llama-3-70B config.json, transcribed)
CONFIG = dict(
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=128000,
    eos_token_id=128001,
)
SHARD_BYTES = 5 * 10**9  # the published checkpoint's shards: 5 GB (30 of them)

#: the plans printed: inspect's arguments after SOURCE
PLANS = [
    ["--device-map", "auto", "--max-memory", "0=22GiB,1=22GiB"],
    ["--device-map", "auto", "--max-memory", "0=22GiB,1=22GiB,cpu=48GiB", "--bits", "8"],
]


def write_headers(folder: Path) -> list[Path]:
    """A header-only bf16 checkpoint of :data:`CONFIG` in ``folder``: the shards' paths."""
    import torch
    from transformers import LlamaConfig

    from leanstream.meta import build_empty_model

    config = LlamaConfig(**CONFIG, dtype=torch.bfloat16, architectures=["LlamaForCausalLM"])
    config.save_pretrained(folder)
    model = build_empty_model(config)  # on meta: shapes only
    tensors = [(n, list(t.shape)) for n, t in model.state_dict().items()]  # persistent ones
    shards: list[list[tuple[str, list[int]]]] = [[]]
    used = 0
    for name, shape in tensors:  # in model order, a new shard when this one is full
        nbytes = 2 * _numel(shape)
        if shards[-1] and used + nbytes > SHARD_BYTES:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += nbytes
    weight_map: dict[str, str] = {}
    paths = []
    for i, shard in enumerate(shards, 1):
        path = folder / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape in sorted(shard):
            end = offset + 2 * _numel(shape)
            header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, end]}
            offset = end
            weight_map[name] = path.name
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # padded to 8 bytes, as safetensors writes it
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            f.truncate(8 + len(text) + offset)  # the data: a hole
        paths.append(path)
    total = sum(2 * _numel(shape) for _, shape in tensors)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return paths


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def resident_pages(paths: list[Path]) -> int:
    """Pages of ``paths`` in the page cache (``mincore`` on a fresh mapping, which faults
    nothing in)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
    libc.mmap.argtypes += [ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page = mmap.PAGESIZE
    count = 0
    for path in paths:
        size = path.stat().st_size
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), f"mmap {path}")
            vec = (ctypes.c_ubyte * (-(-size // page)))()
            try:
                if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                    raise OSError(ctypes.get_errno(), f"mincore {path}")
            finally:
                libc.munmap(ctypes.c_void_p(addr), size)
            count += len(vec) - bytes(vec).count(0)  # the low bit: resident; others 0
        finally:
            os.close(fd)
    return count


def inspect(folder: Path, args: list[str]) -> tuple[str, int, str]:
    """``leanstream inspect FOLDER ARGS`` in a fresh process: (command, exit status, output)."""
    command = [sys.executable, "-m", "leanstream", "inspect", str(folder), *args]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parent.parent / "python"), os.environ.get("PYTHONPATH", "")]
        ),
    }
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    shown = shlex.join(["leanstream", "inspect", folder.name, *args])
    return shown, result.returncode, result.stdout + result.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", help="where to write the checkpoint (default: a temp folder)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="plan70b-", dir=args.dir))
    folder = root / "Llama-3-70B-headers"
    folder.mkdir()
    try:
        paths = write_headers(folder)
        apparent = sum(p.stat().st_size for p in paths)
        on_disk = sum(p.stat().st_blocks * 512 for p in paths)
        print(
            f"wrote {folder}: {len(paths)} shards, {apparent / 1e9:.1f} GB apparent, "
            f"{on_disk / 2**20:.1f} MiB on disk (headers; the data are holes)\n"
        )
        before = resident_pages(paths)
        for plan in PLANS:
            shown, code, output = inspect(folder, plan)
            print(f"$ {shown}\n{output}(exit status {code})\n")
        after = resident_pages(paths)
        print(f"page cache of the shards: {before} pages before the runs, {after} after")
        with open(paths[0], "rb") as f:  # the control: touch one byte of a tensor
            with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
                _ = m[len(m) // 2]
        touched = resident_pages(paths)
        print(f"after touching one byte of {paths[0].name}: {touched} pages")
        if after != before or touched <= after:
            raise SystemExit("inspect read tensor data, or the page count cannot tell")
        print("inspect read no tensor data")
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
