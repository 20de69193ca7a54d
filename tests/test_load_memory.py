"""Peak memory of a CPU 4-bit load, measured from /proc in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

MIB = 1 << 20

CONFIG = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    dtype="bfloat16",
)


def write_big_checkpoint(folder: Path, shard_bytes: int = 64 * MIB) -> int:
    """~310 MB bf16 Llama written shard by shard (never the whole model in memory)."""
    from transformers import LlamaConfig

    from leanstream.meta import build_empty_model

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    shapes = {
        n: tuple(p.shape) for n, p in build_empty_model(LlamaConfig(**CONFIG)).named_parameters()
    }
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    names: list[list[str]] = [[]]
    total = 0
    generator = torch.Generator().manual_seed(0)

    def flush() -> None:
        name = f"model-{len(names):05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard.clear()
        names.append([])

    size = 0
    for name, shape in shapes.items():
        tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        shard[name] = tensor
        size += tensor.nbytes
        total += tensor.nbytes
        if size >= shard_bytes:
            flush()
            size = 0
    if shard:
        flush()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


CHILD = r"""
import json, sys
import torch, transformers, bitsandbytes
import leanstream

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)

window, pipeline = int(sys.argv[2]), sys.argv[3] == "pipeline"
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
model = leanstream.load(
    sys.argv[1], bits=4, device="cpu", progress=False, window=window, pipeline=pipeline,
    ring_bytes=window,
)
peak = status("VmHWM")
print(json.dumps({"base": base, "peak": peak, "model": leanstream.footprint(model).total_bytes}))
"""


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    folder = tmp_path_factory.mktemp("memory") / "big"
    return folder, write_big_checkpoint(folder)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["mapped", "pipeline"])
def test_cpu_4bit_load_peak_rss(big: tuple[Path, int], how: str) -> None:
    """Mapped: window of read-ahead; pipelined: a ring of the same size (the
    checkpoint itself is read with pread and never enters the resident set)."""
    folder, total = big
    assert total > 300e6
    window = 64 * MIB
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), str(window), how],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    budget = result["model"] + window + 256 * MIB
    grew = result["peak"] - result["base"]
    print(f"checkpoint {total / MIB:.0f} MiB, model {result['model'] / MIB:.0f} MiB")
    print(f"peak RSS growth {grew / MIB:.0f} MiB, budget {budget / MIB:.0f} MiB")
    assert result["model"] < total * 0.7
    assert grew < budget, (grew / MIB, budget / MIB)
