"""``python -m leanstream.demo``: the built-in example behind ``make demo``.

Writes a small random-weight Llama checkpoint (bf16, several shards) under
``build/demo-model`` (once), then streams it into 16-bit, NF4, NF4 + double
quant and int8 models on the CPU and prints what each costs and produces.
No network is needed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def write_demo_checkpoint(folder: Path) -> Path:
    """A Llama-shaped model, ~56 MB in bf16, saved in 8 MB shards."""
    if (folder / "model.safetensors.index.json").exists():
        return folder
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=8192,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = folder.with_name(folder.name + ".partial")
    model.save_pretrained(tmp, max_shard_size="8MB")
    tmp.rename(folder)
    return folder


def main(argv: list[str] | None = None) -> None:
    import logging

    import leanstream

    # bitsandbytes logs a warning on every int8 matmul with bf16 inputs: keep the table readable
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path("build/demo-model"))
    args = parser.parse_args(argv)
    args.folder.parent.mkdir(parents=True, exist_ok=True)
    folder = write_demo_checkpoint(args.folder)
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    print(f"checkpoint: {folder} ({len(shards)} shards)")
    prompt = torch.tensor([[1, 306, 4997, 310, 2834, 338]])
    print(f"{'setting':<16} {'load s':>7} {'footprint':>12} {'tokens generated from the prompt'}")
    for label, kwargs in [
        ("bf16 (bits=16)", dict(bits=16)),
        ("nf4", dict(bits=4)),
        ("nf4 + double q.", dict(bits=4, double_quant=True)),
        ("fp4", dict(bits=4, quant_type="fp4")),
        ("int8", dict(bits=8)),
    ]:
        start = time.perf_counter()
        model = leanstream.load(folder, device="cpu", progress=False, **kwargs)
        seconds = time.perf_counter() - start
        size = leanstream.footprint(model).total_bytes
        out = model.generate(prompt, max_new_tokens=8, do_sample=False)
        tokens = out[0, prompt.shape[1] :].tolist()
        print(f"{label:<16} {seconds:>7.2f} {size / 2**20:>9.1f} MiB {tokens}")


if __name__ == "__main__":
    main()
