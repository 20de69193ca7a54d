"""Mixture-of-experts benchmark: leanstream vs transformers + bitsandbytes, on the CPU.

    python benches/moe.py                    # Qwen3-MoE-like shapes, 1.6 GiB bf16
    python benches/moe.py --shapes tiny --reps 1    # a smoke test
    python benches/moe.py --record           # append the table to benches/RESULTS.md

Writes (once, cached under ``~/.cache/leanstream/bench``) a synthetic bf16 checkpoint
with Qwen3-MoE's architecture at reduced width (see ``SHAPES``), stored as
transformers' ``save_pretrained`` stores it: one tensor per expert and projection
(``mlp.experts.7.gate_proj.weight``), which transformers merges into its 3-D
``experts.gate_up_proj`` / ``down_proj`` when loading. Values are cut from the seeded
pool of ``benches/load.py``.

Each loader runs in its own fresh process through ``benches/load.py``'s machinery
(imports before the clock, only the load call timed, ``/proc/<pid>/status`` sampled
every 5 ms for the peak RSS). After the load the child measures, outside the timing
that the table reports as load: ``leanstream.footprint`` of the model and of its experts
modules. The forwards (``--forward`` loaders, and with ``--dense`` bitsandbytes' 4-bit,
int8 and bf16 on the dense counterpart, :func:`write_dense_checkpoint`) are timed in
``--forward-rounds`` rounds of fresh children, every model once a round: the tokens/s of
one 128-token prompt (prefill, after a short warm-up) and of 16 greedy decode steps on
its KV cache, best of 3 in a child and best over the rounds (the host's speed drifts by
tens of percent from minute to minute; interleaving spreads it over the models alike).
transformers + bitsandbytes quantizes only the ``nn.Linear`` layers: its experts stay
bf16, so its forward is the "bf16 experts" reference. The transformers children also
check that every tensor of the checkpoint was used and none was missing.

Targets (issue 16): experts bytes <= 0.29x their bf16 bytes at 4 bits (<= 0.52x at 8),
load >= 5x faster than transformers at the same bits, peak RSS growth <= the quantized
model + 0.5 GiB; (issue 27) load <= 1.3x the floor measured in the same run
(:func:`floor_seconds`: reading the files from the page cache plus the native quantizer
over the bytes a load quantizes); MoE decode vs bf16 experts >= bitsandbytes' dense
4-bit (int8) vs bf16 in the same run, and on an AVX512-BF16 CPU NF4 decode and prefill
>= 1.0x bf16 experts. The sizes predicted by ``benches/moe_sizes.py`` (the code behind
``leanstream inspect``) are printed next to the measured ones.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load as load_bench  # benches/load.py: checkpoint pool, child runner
import moe_sizes

GIB = load_bench.GIB

SHAPES: dict[str, dict[str, Any]] = {
    # Qwen3-30B-A3B's layout (128-wide heads, 4:1 grouped-query attention, top-8 routing,
    # normalized top-k, every layer sparse), narrower and shallower: 1.6 GiB of bf16
    "qwen3moe-1.6g": dict(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=3072,
        moe_intermediate_size=512,
        num_hidden_layers=10,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        num_experts=48,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    ),
    "tiny": dict(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    ),
}

LOADERS = {
    "leanstream nf4": ("leanstream", dict(bits=4, quant_type="nf4")),
    "leanstream int8": ("leanstream", dict(bits=8)),
    "leanstream nf4 pipelined": ("leanstream", dict(bits=4, quant_type="nf4", pipeline=True)),
    "transformers nf4": ("transformers", dict(bits=4, quant_type="nf4")),
    "transformers int8": ("transformers", dict(bits=8)),
    "transformers bf16": ("transformers", dict(bits=16)),
}
DEFAULT_LOADERS = "leanstream nf4,leanstream int8,transformers nf4,transformers int8"
DEFAULT_FORWARD = "leanstream nf4,leanstream int8,transformers nf4,transformers int8"
#: the dense model's loaders (``--dense``): bitsandbytes' 4-bit layers against bf16
DENSE_LOADERS = ("transformers nf4", "transformers int8", "transformers bf16")

CHILD = (
    r"""
import json, sys, time
args = json.loads(sys.argv[1])
import torch, transformers, bitsandbytes as bnb  # imported before the clock starts
import leanstream, leanstream.loader  # its modules are imported lazily, at the first load
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
kind, s, device, folder = args["kind"], dict(args["settings"]), args["device"], args["folder"]
forward = s.pop("forward")
dtype = torch.bfloat16

def bnb_config():
    if s["bits"] == 16:
        return None
    if s["bits"] == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=s["quant_type"],
                              bnb_4bit_use_double_quant=False, bnb_4bit_compute_dtype=dtype)

"""
    + load_bench.WARM_TRANSFORMERS
    + r"""
print("ready", flush=True)
sys.stdin.readline()
start = time.perf_counter()
if kind == "leanstream":
    if s["bits"] == 4:
        s["compute_dtype"] = dtype
    model = leanstream.load(folder, device=device, progress=False, **s)
else:
    model, info = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=bnb_config(), device_map=device, output_loading_info=True,
        dtype=dtype)
seconds = time.perf_counter() - start
print("loaded", flush=True)
sys.stdin.readline()
result = {"seconds": seconds, "tables": tables}
if kind == "transformers":
    bad = {k: sorted(v)[:3] for k, v in info.items() if v and k != "error_msgs"}
    if bad or info.get("error_msgs"):
        raise SystemExit(f"transformers did not load the checkpoint cleanly: {info}")
result["footprint"] = leanstream.footprint(model).total_bytes
result["experts"] = sum(leanstream.footprint(m).total_bytes
                        for n, m in model.named_modules() if n.endswith(".experts"))
if forward:
    model.eval()
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, forward["prompt"]), device=device)
    prefill, decode = [], []
    with torch.no_grad():
        model(input_ids=ids[:, :8])  # warm-up: first-call costs out of the figures
        for _ in range(forward["reps"]):  # best of: the 2 cores may be shared
            t = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            prefill.append(time.perf_counter() - t)
            logits, cache = out.logits[:, -1].float(), out.past_key_values
            token, tokens = logits.argmax(-1, keepdim=True), []
            t = time.perf_counter()
            for _ in range(forward["decode"]):
                out = model(input_ids=token, past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(int(token))
            decode.append(time.perf_counter() - t)
    result["prefill_s"], result["decode_s"] = min(prefill), min(decode)
    torch.save(logits.cpu(), args["logits"])
    result["tokens"] = tokens
    if kind == "leanstream" and hasattr(model, "set_experts_implementation"):
        # the same quantized experts, each dequantized and multiplied in bf16 (the eager
        # forward): how far bitsandbytes' kernels round from it
        model.set_experts_implementation("eager")
        with torch.no_grad():
            exact = model(input_ids=ids).logits[:, -1].float()
        result["kernel_rel"] = float((logits - exact).norm() / exact.norm())
        result["kernel_max"] = float((logits - exact).abs().max())
        result["logit_max"] = float(exact.abs().max())
print("result", json.dumps(result), flush=True)
"""
)


def _qwen3_shapes(fields: dict[str, Any], config: Any, mlp: Any) -> dict[str, tuple[int, ...]]:
    """The tensors ``save_pretrained`` writes for a Qwen3 (-MoE) model of ``fields``, in
    order: embeddings, each layer's norms and attention then ``mlp(prefix)``'s tensors,
    the final norm and ``lm_head``."""
    h, heads, kv, d = (fields[k] for k in ("hidden_size", "num_attention_heads",
                                           "num_key_value_heads", "head_dim"))  # fmt: skip
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h)}
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (heads * d, h),
                p + "self_attn.k_proj.weight": (kv * d, h),
                p + "self_attn.v_proj.weight": (kv * d, h),
                p + "self_attn.o_proj.weight": (h, heads * d),
                p + "self_attn.q_norm.weight": (d,),
                p + "self_attn.k_norm.weight": (d,),
                **mlp(p),
            }
        )
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


def write_checkpoint(folder: Path, shape: str, shard_bytes: int = 2 * GIB) -> Path:
    """Random bf16 weights under the names ``save_pretrained`` gives a Qwen3-MoE model.

    Written by ``benches/load.py``'s :func:`write_random_checkpoint` (seeded pool, one
    shard at a time, a temporary folder renamed into place when complete).
    """
    if (folder / "model.safetensors.index.json").exists():
        return folder
    import torch
    from transformers import Qwen3MoeConfig

    fields = SHAPES[shape]
    config = Qwen3MoeConfig(**fields)
    config.dtype = torch.bfloat16
    h, i, e = fields["hidden_size"], fields["moe_intermediate_size"], fields["num_experts"]

    def mlp(p: str) -> dict[str, tuple[int, ...]]:
        out = {p + "mlp.gate.weight": (e, h)}
        for n in range(e):
            out[p + f"mlp.experts.{n}.gate_proj.weight"] = (i, h)
            out[p + f"mlp.experts.{n}.up_proj.weight"] = (i, h)
            out[p + f"mlp.experts.{n}.down_proj.weight"] = (h, i)
        return out

    shapes = _qwen3_shapes(fields, config, mlp)
    return load_bench.write_random_checkpoint(folder, config, shapes, shard_bytes)


def write_dense_checkpoint(folder: Path, shape: str, shard_bytes: int = 2 * GIB) -> Path:
    """The dense counterpart of ``shape`` (``--dense``): Qwen3 (dense) with the same
    vocabulary, width, depth and attention, and an MLP as wide as the experts a token is
    routed to (``moe_intermediate_size * num_experts_per_tok``): the same work per token.
    Random bf16 weights, written as :func:`write_checkpoint` writes."""
    if (folder / "model.safetensors.index.json").exists():
        return folder
    import torch
    from transformers import Qwen3Config

    fields = dict(SHAPES[shape])
    width = fields.pop("moe_intermediate_size") * fields.pop("num_experts_per_tok")
    for key in ("num_experts", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers"):
        fields.pop(key, None)
    config = Qwen3Config(**{**fields, "intermediate_size": width})
    config.dtype = torch.bfloat16
    h = fields["hidden_size"]

    def mlp(p: str) -> dict[str, tuple[int, ...]]:
        return {
            p + "mlp.gate_proj.weight": (width, h),
            p + "mlp.up_proj.weight": (width, h),
            p + "mlp.down_proj.weight": (h, width),
        }

    shapes = _qwen3_shapes(fields, config, mlp)
    return load_bench.write_random_checkpoint(folder, config, shapes, shard_bytes)


def floor_seconds(folder: Path, bits: int, reps: int = 3) -> dict[str, float]:
    """The load's floor (issue 27): reading the checkpoint's files from the page cache
    (``readinto`` one reused 64 MiB buffer: what a warm read of its bytes costs), and the
    native quantizer over the bytes a load quantizes at ``bits`` (every 2-D weight but
    the embeddings, ``lm_head`` and the routers, whose rows are not whole 32s), from an
    ``mmap`` of the warm files, into preallocated outputs, with torch's thread count.
    Best of ``reps`` each; ``{"read": s, "quantize": s, "floor": read + quantize}``."""
    import mmap
    import time

    import numpy as np
    import torch

    from leanstream import _core

    files = sorted(folder.glob("*.safetensors"))
    buffer = bytearray(64 << 20)
    best_read = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        for path in files:
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buffer):
                    pass
        best_read = min(best_read, time.perf_counter() - start)
    with _core.Checkpoint([str(p) for p in files]) as ckpt:
        infos = [ckpt[key] for key in ckpt.keys()]
    work = [
        info
        for info in infos
        if len(info.shape) == 2
        and info.dtype == "BF16"
        and info.shape[0] % 32 == 0
        and not any(part in info.name for part in ("embed_tokens", "lm_head"))
    ]
    maps = {}
    for path in files:
        with open(path, "rb") as f:
            maps[str(path)] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    largest = max(info.nbytes for info in work)
    packed = np.empty(largest // 4, dtype=np.uint8)  # bf16 → 4 bits: a quarter
    absmax = np.empty(largest // 2 // 64, dtype=np.float32)
    cb = np.empty(largest // 2, dtype=np.int8)
    scb = np.empty(max(info.shape[0] for info in work), dtype=np.float32)
    threads = torch.get_num_threads()
    best_quant = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        for info in work:
            data = memoryview(maps[info.file])[info.start : info.end]
            n = info.nbytes // 2
            if bits == 4:
                _core.quantize_4bit(
                    data, "BF16", packed[: n // 2], absmax[: n // 64],
                    quant_type="nf4", blocksize=64, threads=threads,
                )  # fmt: skip
            else:
                rows, cols = info.shape
                _core.quantize_int8(data, "BF16", cols, cb[:n], scb[:rows], threads=threads)
            data.release()
        best_quant = min(best_quant, time.perf_counter() - start)
    for m in maps.values():
        m.close()
    return {"read": best_read, "quantize": best_quant, "floor": best_read + best_quant}


def _peer(name: str) -> str:
    return "transformers nf4" if LOADERS[name][1]["bits"] == 4 else "transformers int8"


def _mark(ok: bool) -> str:
    return "met" if ok else "**missed**"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=list(SHAPES), default="qwen3moe-1.6g")
    parser.add_argument("--reps", type=int, default=2, help="loads per loader (median)")
    parser.add_argument("--loaders", default=DEFAULT_LOADERS, help="comma-separated names")
    parser.add_argument(
        "--forward",
        default=DEFAULT_FORWARD,
        help="loaders whose children also measure tokens/s (in their last run); '' for none",
    )
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (prefill)")
    parser.add_argument("--decode", type=int, default=16, help="greedy decode steps")
    parser.add_argument(
        "--forward-reps", type=int, default=3, help="prefill + decode runs per process (best of)"
    )
    parser.add_argument(
        "--forward-rounds",
        type=int,
        default=3,
        help="fresh processes per forward-timed model, interleaved (best of)",
    )
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/leanstream/bench")
    parser.add_argument("--run-timeout", type=float, default=300.0)
    parser.add_argument(
        "--dense",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the forward of the dense counterpart (bitsandbytes 4-bit vs bf16)",
    )
    parser.add_argument("--record", action="store_true", help="append the table to RESULTS.md")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    names = [n.strip() for n in args.loaders.split(",")]
    forward = {n.strip() for n in args.forward.split(",") if n.strip()}
    if unknown := [n for n in [*names, *forward] if n not in LOADERS]:
        parser.error(f"unknown loaders {unknown}; known: {', '.join(LOADERS)}")

    fields = SHAPES[args.shapes]
    folder = write_checkpoint(args.cache / f"moe-{args.shapes}-bf16", args.shapes)
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    predicted = moe_sizes.predict("qwen3_moe", fields)
    experts_bf16 = predicted["experts bf16"]
    runs: dict[str, list[dict]] = {n: [] for n in names}
    failures: list[str] = []
    work = Path(tempfile.mkdtemp(prefix="leanstream-bench-"))
    load_bench.CHILD = CHILD  # load.run_one runs load.CHILD: ours, through its machinery
    interrupted = False
    load_start = os.getloadavg()[0]  # 2 cores shared with other work: say how busy
    forwards: dict[str, dict[str, Any]] = {}  # loader (or "dense <loader>") -> best forward
    try:
        for rep in range(args.reps):
            for name in names:  # interleaved, so drift hits every loader alike
                kind, settings = LOADERS[name]
                path = work / f"{name.replace(' ', '_')}.pt"
                result = load_bench.try_run(
                    rep,
                    name,
                    failures,
                    kind,
                    dict(settings, forward=None),
                    folder,
                    "cpu",
                    path,
                    args.run_timeout,
                )
                if result is None:
                    continue
                runs[name].append(result)
                grow = result["peak_rss"] - result["base_rss"]
                print(
                    f"rep {rep} {name}: {result['seconds']:.2f} s, peak RSS +{grow / GIB:.2f} "
                    f"GiB, footprint {result['footprint'] / GIB:.3f} GiB",
                    flush=True,
                )
        # the forwards: rounds of fresh children, every model once a round (interleaved,
        # so that the host's drift hits them alike), each figure the best over the rounds
        jobs = [(name, folder) for name in names if name in forward]
        if args.dense:  # the same work per token, dense: bitsandbytes' 4-bit / int8 vs bf16
            dense_folder = write_dense_checkpoint(
                args.cache / f"dense-{args.shapes}-bf16", args.shapes
            )
            jobs += [(f"dense {name}", dense_folder) for name in DENSE_LOADERS]
        fwd = dict(prompt=args.prompt, decode=args.decode, reps=args.forward_reps)
        for rnd in range(args.forward_rounds):
            for key, where in jobs:
                kind, settings = LOADERS[key.removeprefix("dense ")]
                path = work / f"{key.replace(' ', '_')}-{rnd}.pt"
                result = load_bench.try_run(
                    rnd,
                    key,
                    failures,
                    kind,
                    dict(settings, forward=fwd),
                    where,
                    "cpu",
                    path,
                    args.run_timeout,
                )
                if result is None:
                    continue
                result["logits"] = path
                print(
                    f"round {rnd} {key}: prefill {args.prompt / result['prefill_s']:.1f} "
                    f"tok/s, decode {args.decode / result['decode_s']:.2f} tok/s",
                    flush=True,
                )
                best = forwards.setdefault(key, result)  # logits and tokens: the first's
                best["prefill_s"] = min(best["prefill_s"], result["prefill_s"])
                best["decode_s"] = min(best["decode_s"], result["decode_s"])
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: the tables have the runs measured so far", flush=True)

    ok = {n: runs[n] for n in names if runs[n]}
    median = {n: statistics.median(r["seconds"] for r in rs) for n, rs in ok.items()}
    expect = {
        "leanstream nf4": "leanstream 4-bit",
        "leanstream nf4 pipelined": "leanstream 4-bit",
        "leanstream int8": "leanstream 8-bit",
        "transformers nf4": "transformers 4-bit",
        "transformers int8": "transformers 8-bit",
    }
    lines = [
        f"checkpoint: Qwen3-MoE layout, `{args.shapes}` shapes ("
        + ", ".join(f"{k}={v}" for k, v in fields.items() if not isinstance(v, list))
        + f"), bf16, {size / GIB:.2f} GiB, of which experts {experts_bf16 / GIB:.2f} GiB, "
        f"one tensor per expert on disk; CPU, warm page cache; {args.reps} load(s) per loader "
        f"(median, min-max); load average {load_start:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end" + ("; INTERRUPTED" if interrupted else ""),
        "",
        "| loader | load s | min-max | vs transformers | peak RSS growth | model GiB "
        "(predicted) | experts GiB | experts / bf16 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        if name not in ok:
            lines.append(f"| {name} | failed |" + " |" * 6)
            continue
        rs, peer = ok[name], _peer(name)
        ratio = ""
        if peer in median and peer != name:
            best = min(x["seconds"] for x in ok[peer]) / min(x["seconds"] for x in rs)
            ratio = f"{median[peer] / median[name]:.1f}x faster (fastest runs: {best:.1f}x)"
        grow = max(r["peak_rss"] - r["base_rss"] for r in rs)
        r = rs[-1]
        lines.append(
            f"| {name} | {median[name]:.2f} | {min(x['seconds'] for x in rs):.2f}-"
            f"{max(x['seconds'] for x in rs):.2f} | {ratio} | {grow / GIB:.2f} GiB | "
            f"{r['footprint'] / GIB:.3f} ({predicted[expect[name]] / GIB:.3f}) | "
            f"{r['experts'] / GIB:.3f} | {r['experts'] / experts_bf16:.3f} |"
        )

    fwd_rows = [n for n in names if n in forwards]
    dense = {n.removeprefix("dense "): r for n, r in forwards.items() if n.startswith("dense ")}
    fwd_speed: dict[str, tuple[float, float]] = {}  # name -> (prefill, decode) vs peer
    dense_speed: dict[int, tuple[float, float]] = {}  # bits -> (prefill, decode) vs bf16
    import bitsandbytes.functional as bnb_functional

    fused = bool(bnb_functional.has_avx512bf16())
    if fwd_rows:
        lines += [
            "",
            f"forward, batch 1: a {args.prompt}-token prompt (prefill, after an 8-token "
            f"warm-up), then {args.decode} greedy decode steps on the KV cache, best of "
            f"{args.forward_reps} in each of {args.forward_rounds} rounds of fresh processes "
            "(every model once a round); transformers' experts are bf16; bitsandbytes' fused "
            f"AVX512-BF16 CPU kernel: {'yes' if fused else 'no'}. vs peer: the speed over "
            "that of the same layers' bitsandbytes with bf16 experts (MoE), or of bf16 "
            "(dense). Kernels vs dequantized: the prefill's last logits against the same "
            "model's eager forward on the dequantized experts (relative error; largest "
            "difference / largest logit)",
            "",
            "| model | experts | prefill tok/s | decode tok/s | prefill vs peer | decode vs peer "
            "| logits vs transformers (rel. err) | same greedy tokens | kernels vs dequantized |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name in fwd_rows:
            r, peer = forwards[name], _peer(name)
            p = forwards.get(peer)
            err = same = vs_p = vs_d = kernel = ""
            if p is not None and peer != name:
                import torch

                a, b = torch.load(p["logits"]), torch.load(r["logits"])
                err = f"{((a - b).norm() / a.norm()).item():.3f}"
                agree = sum(x == y for x, y in zip(r["tokens"], p["tokens"], strict=True))
                same = f"{agree}/{args.decode}"
                fwd_speed[name] = (
                    p["prefill_s"] / r["prefill_s"],
                    p["decode_s"] / r["decode_s"],
                )
                vs_p, vs_d = (f"{x:.2f}x" for x in fwd_speed[name])
            if "kernel_rel" in r:
                kernel = f"{r['kernel_rel']:.4f}; {r['kernel_max']:.3f} / {r['logit_max']:.2f}"
            experts = "bf16" if name.startswith("transformers") else name.split()[1]
            lines.append(
                f"| {name} | {experts} | {args.prompt / r['prefill_s']:.1f} | "
                f"{args.decode / r['decode_s']:.2f} | {vs_p} | {vs_d} | {err} | {same} "
                f"| {kernel} |"
            )
        if "transformers bf16" in dense:
            base = dense["transformers bf16"]
            for name in DENSE_LOADERS:
                if name not in dense:
                    continue
                r = dense[name]
                vs = (base["prefill_s"] / r["prefill_s"], base["decode_s"] / r["decode_s"])
                bits = LOADERS[name][1]["bits"]
                if bits != 16:
                    dense_speed[bits] = vs
                lines.append(
                    f"| dense: {name} | (dense) | {args.prompt / r['prefill_s']:.1f} | "
                    f"{args.decode / r['decode_s']:.2f} | {vs[0]:.2f}x | {vs[1]:.2f}x | | | |"
                )

    floors = {bits: floor_seconds(folder, bits) for bits in (4, 8)}
    lines += [
        "",
        "the floor (issue 27), in this process, best of 3: reading the files from the page "
        "cache, plus the native quantizer over the bytes a load quantizes (mapped, warm)",
        "",
        "| bits | read s | quantize s | floor s |",
        "|---|---|---|---|",
        *(
            f"| {bits} | {f['read']:.2f} | {f['quantize']:.2f} | {f['floor']:.2f} |"
            for bits, f in floors.items()
        ),
    ]
    tables = [r["tables"] for n in names for r in ok.get(n, []) if "tables" in r]
    if tables:
        lines += [
            "",
            "not in the loads above: transformers' checkpoint conversion tables (every "
            "architecture's renaming regexes), which the first load of a process builds, "
            "leanstream's and transformers' alike; each child builds them before the clock: "
            f"median {statistics.median(tables):.2f} s ({min(tables):.2f}-{max(tables):.2f})",
        ]
    targets = []
    for name in names:
        if name not in ok or not name.startswith("leanstream"):
            continue
        r, bits = ok[name][-1], LOADERS[name][1]["bits"]
        floor = floors[bits]["floor"]
        over = median[name] / floor
        targets.append(
            f"| {name} | load <= 1.3x the floor ({floor:.2f} s; issue 27) | {over:.2f}x "
            f"| {_mark(over <= 1.3)} |"
        )
        share, limit = r["experts"] / experts_bf16, 0.29 if bits == 4 else 0.52
        targets.append(
            f"| {name} | experts <= {limit}x bf16 | {share:.3f}x | {_mark(share <= limit)} |"
        )
        if _peer(name) in median:
            speed = median[_peer(name)] / median[name]
            targets.append(
                f"| {name} | load >= 5x faster (medians) | {speed:.1f}x | {_mark(speed >= 5)} |"
            )
        grow = max(x["peak_rss"] - x["base_rss"] for x in ok[name])
        bound = r["footprint"] + GIB // 2
        targets.append(
            f"| {name} | peak RSS growth <= model + 0.5 GiB ({bound / GIB:.2f} GiB) | "
            f"{grow / GIB:.2f} GiB | {_mark(grow <= bound)} |"
        )
    for name in names:  # issue 27, item 2: the experts cost no more than dense layers do
        if name not in fwd_speed or not name.startswith("leanstream"):
            continue
        bits = LOADERS[name][1]["bits"]
        (prefill, decode), ref = fwd_speed[name], dense_speed.get(bits)
        for what, got, dense_ratio in (
            ("decode", decode, ref and ref[1]),
            ("prefill", prefill, ref and ref[0]),
        ):
            if dense_ratio:
                targets.append(
                    f"| {name} | {what} vs bf16 experts >= dense {bits}-bit vs bf16 "
                    f"({dense_ratio:.2f}x) | {got:.2f}x | {_mark(got >= dense_ratio)} |"
                )
        if bits == 4 and fused:
            targets += [
                f"| {name} | decode >= 1.0x bf16 experts (AVX512-BF16; stretch 1.5x) | "
                f"{decode:.2f}x | {_mark(decode >= 1.0)}{' (stretch met)' * (decode >= 1.5)} |",
                f"| {name} | prefill >= 1.0x bf16 experts (AVX512-BF16) | {prefill:.2f}x | "
                f"{_mark(prefill >= 1.0)} |",
            ]
    if targets:
        lines += [
            "",
            "| loader | target (issues 16, 27) | measured | |",
            "|---|---|---|---|",
            *targets,
        ]
    load_bench.publish(
        lines, failures, work, args.record, "moe.py", argv, "transformers", "bitsandbytes"
    )
    return 1 if failures or interrupted or not ok else 0


if __name__ == "__main__":
    sys.exit(main())
