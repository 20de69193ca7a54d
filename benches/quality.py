"""The quality cost of quantizing embeddings and lm_head, against the bf16 model.

For a tiny Llama (random weights written by ``tests/models.py``'s ``write_model``:
no trained checkpoint is reachable offline, so the absolute perplexities mean
little; the relative changes are what to read), loads the bf16 model and each
quantized setting with and without ``quantize_embeddings`` / ``quantize_lm_head``,
and reports on a fixed token sequence (sampled from the bf16 model, seed 0):

- the relative error of the logits, ``||q - ref|| / ||ref||``;
- the perplexity of the sequence under each model, and its ratio to bf16's;
- the parameter bytes (``leanstream.footprint``).

    python benches/quality.py            # print the table
    python benches/quality.py --record   # and append it to benches/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

SIZE = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    vocab_size=4096,
    max_position_embeddings=512,
)
SETTINGS = {
    "nf4": dict(bits=4, quant_type="nf4"),
    "nf4 + double": dict(bits=4, quant_type="nf4", double_quant=True),
    "fp4": dict(bits=4, quant_type="fp4"),
    "int8": dict(bits=8),
}
FLAGS = {
    "-": {},
    "embeddings": dict(quantize_embeddings=True),
    "lm_head": dict(quantize_lm_head=True),
    "both": dict(quantize_embeddings=True, quantize_lm_head=True),
}


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
    return float(loss.exp())


def measure(tied: bool, tokens: int) -> list[list[str]]:
    import leanstream
    from models import write_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_model(
            Path(tmp) / "llama", "llama", max_shard_size="50MB", tie_word_embeddings=tied, **SIZE
        )
        ref = leanstream.load(folder, bits=16, device="cpu", progress=False)
        generator = torch.Generator().manual_seed(0)
        ids = torch.tensor([[1]])
        with torch.no_grad():
            for _ in range(tokens - 1):  # a sequence the bf16 model finds likely
                probs = ref(input_ids=ids).logits[0, -1].float().softmax(-1)
                ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)[None]], 1)
            ref_logits = ref(input_ids=ids).logits.float()
        ref_ppl = perplexity(ref_logits, ids)
        ref_bytes = leanstream.footprint(ref).total_bytes
        rows = [["bf16", "-", "0", f"{ref_ppl:.2f}", "1.000", f"{ref_bytes / 1e6:.2f}"]]
        for name, setting in SETTINGS.items():
            for flag, kwargs in FLAGS.items():
                model = leanstream.load(folder, device="cpu", progress=False, **setting, **kwargs)
                with torch.no_grad():
                    logits = model(input_ids=ids).logits.float()
                rel = float((logits - ref_logits).norm() / ref_logits.norm())
                ppl = perplexity(logits, ids)
                size = leanstream.footprint(model).total_bytes / 1e6
                rows.append(
                    [name, flag, f"{rel:.4f}", f"{ppl:.2f}", f"{ppl / ref_ppl:.3f}", f"{size:.2f}"]
                )
    return rows


def table(rows: list[list[str]]) -> str:
    head = ["setting", "quantized too", "logits rel. error", "perplexity", "ppl / bf16", "MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    import bitsandbytes
    import transformers

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, {platform.machine()}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, bitsandbytes {bitsandbytes.__version__}, "
        f"Python {platform.python_version()}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128, help="sequence length (default 128)")
    parser.add_argument("--record", action="store_true", help="append to benches/RESULTS.md")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    sections = []
    for tied in (False, True):
        title = "tied embeddings (one shared tensor)" if tied else "untied embeddings"
        text = table(measure(tied, args.tokens))
        sections.append(f"{title}:\n\n{text}")
        print(f"{title}:\n\n{text}\n")
    if args.record:
        command = "python benches/quality.py" + (" " + " ".join(argv or sys.argv[1:])).rstrip()
        date = datetime.date.today().isoformat()
        shape = ", ".join(f"{k}={v}" for k, v in SIZE.items())
        body = "\n\n".join(sections)
        entry = (
            f"\n## {date} — `{command}`\n\nMachine: {machine()}\n\n"
            f"Tiny Llama with random weights ({shape}; `tests/models.py` `write_model`), "
            f"{args.tokens} tokens sampled from the bf16 model; CPU, bf16 compute. "
            "Random weights: read the ratios, not the absolute perplexities.\n\n"
            f"{body}\n"
        )
        with open(ROOT / "benches" / "RESULTS.md", "a") as out:
            out.write(entry)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__: list[Any] = []
