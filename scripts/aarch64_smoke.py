"""The aarch64 smoke test that ``scripts/aarch64.sh smoke`` runs under qemu-user.

A tiny random Llama (bf16, sharded safetensors) loaded by ``leanstream.load`` at NF4 and
int8 on the emulated aarch64 CPU (its native quantizer: bitsandbytes' is refused while it
loads), checked there against bitsandbytes:

* every quantized ``Linear`` bit for bit: the packed weight and absmax (NF4) or CB and SCB
  (int8) equal ``bitsandbytes.functional.quantize_4bit`` / ``int8_vectorwise_quant`` of the
  stored bf16 weight, and equal transformers + bitsandbytes' own quantized model
  (``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))``);
* a forward runs, its logits finite and equal to that model's.

Prints the wall time of each step. Exits 1 on the first mismatch. Usage:
``python aarch64_smoke.py FOLDER`` (FOLDER: where the checkpoint is written).
"""

from __future__ import annotations

import copy
import platform
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()


def say(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:7.1f} s] {message}", flush=True)


class Timer:
    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            say(f"{self.what}: {time.perf_counter() - self.start:.1f} s")


failures: list[str] = []


def check(ok: bool, what: str) -> None:
    if not ok:
        failures.append(what)
        say(f"MISMATCH {what}")


def refuse(*args: object, **kwargs: object) -> None:
    raise AssertionError("leanstream's native path called bitsandbytes' quantizer")


def main(folder: Path) -> int:
    say(f"{platform.machine()}, CPython {platform.python_version()}")
    with Timer("import torch"):
        import torch
    say(f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}")
    with Timer("import bitsandbytes"):
        import bitsandbytes as bnb
        import bitsandbytes.functional as F
    with Timer("import transformers"):
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig
    with Timer("import leanstream"):
        import leanstream
        from leanstream import cpu_layout
    say(f"bitsandbytes {bnb.__version__}, leanstream from {Path(leanstream.__file__).parent}")

    with Timer("write the tiny Llama (save_pretrained)"):
        torch.manual_seed(0)
        config = LlamaConfig(
            hidden_size=64,
            intermediate_size=192,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
            max_position_embeddings=128,
            tie_word_embeddings=False,
        )
        config.dtype = torch.bfloat16
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        with torch.no_grad():  # random init leaves norms constant: perturb everything
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.02)
        model.save_pretrained(folder, max_shard_size="40KB")
        del model
    from safetensors.torch import load_file

    stored: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        stored.update(load_file(shard))
    say(f"{len(stored)} tensors in {len(list(folder.glob('*.safetensors')))} shards")

    ids = torch.tensor([[1, 5, 9, 42, 7, 100, 11, 2]])
    settings = {
        "nf4": (
            dict(bits=4, quant_type="nf4", double_quant=False, compute_dtype=torch.bfloat16),
            BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=False,
                bnb_4bit_compute_dtype=torch.bfloat16,
            ),
        ),
        "int8": (dict(bits=8), BitsAndBytesConfig(load_in_8bit=True)),
    }
    for name, (ours_kwargs, ref_config) in settings.items():
        # leanstream's native (Rust) quantizer must make the bytes: bitsandbytes' own
        # quantizer is refused while it loads
        real = F.quantize_4bit, F.int8_vectorwise_quant
        F.quantize_4bit = F.int8_vectorwise_quant = refuse
        try:
            with Timer(f"{name}: leanstream.load (native quantizer)"):
                got = leanstream.load(folder, device="cpu", progress=False, **ours_kwargs)
        finally:
            F.quantize_4bit, F.int8_vectorwise_quant = real
        with Timer(f"{name}: transformers + bitsandbytes from_pretrained"):
            ref = AutoModelForCausalLM.from_pretrained(
                folder, quantization_config=ref_config, device_map="cpu"
            ).eval()
        with Timer(f"{name}: bit-identity checks"):
            ref_modules = dict(ref.named_modules())
            functional = twins = 0
            layouts: set[str] = set()
            for path, module in got.named_modules():
                if isinstance(module, bnb.nn.Linear4bit):
                    weight, state = module.weight, module.weight.quant_state
                    check(state.blocksize == 64, f"{name} {path}: blocksize {state.blocksize}")
                    want, want_state = F.quantize_4bit(
                        stored[f"{path}.weight"],
                        blocksize=state.blocksize,
                        quant_type="nf4",
                        quant_storage=weight.data.dtype,
                    )
                    twin = ref_modules[path]
                    check(type(twin) is type(module), f"{name} {path}: {type(twin).__name__}")
                    twin_data, twin_state = twin.weight.data, twin.weight.quant_state
                    if cpu_layout.is_packed(state):
                        # an AVX512-BF16 CPU (not an aarch64 one): leanstream loads in the
                        # fused kernel's layout, the one bitsandbytes' first forward makes
                        layouts.add("fused")
                        want, want_state = F._convert_weight_packed_for_cpu(want, want_state)
                        if not cpu_layout.is_packed(twin_state):  # a copy: its forward does it
                            twin_data, twin_state = F._convert_weight_packed_for_cpu(
                                twin_data.clone(), copy.deepcopy(twin_state)
                            )
                    else:
                        layouts.add("plain")
                    check(
                        torch.equal(weight.data.view(torch.uint8), want.view(torch.uint8)),
                        f"{name} {path}: packed weight vs F.quantize_4bit",
                    )
                    check(
                        torch.equal(state.absmax, want_state.absmax),
                        f"{name} {path}: absmax vs F.quantize_4bit",
                    )
                    functional += 1
                    check(
                        torch.equal(weight.data.view(torch.uint8), twin_data.view(torch.uint8))
                        and torch.equal(state.absmax, twin_state.absmax)
                        and torch.equal(state.code, twin_state.code),
                        f"{name} {path}: vs transformers",
                    )
                    twins += 1
                elif isinstance(module, bnb.nn.Linear8bitLt):
                    weight = module.weight
                    cb, scb, _ = F.int8_vectorwise_quant(stored[f"{path}.weight"].half())
                    check(
                        weight.dtype == torch.int8 and torch.equal(weight.data, cb),
                        f"{name} {path}: CB vs F.int8_vectorwise_quant",
                    )
                    check(torch.equal(weight.SCB, scb), f"{name} {path}: SCB vs functional")
                    functional += 1
                    twin = ref_modules[path]
                    check(
                        torch.equal(weight.data, twin.weight.data)
                        and torch.equal(weight.SCB, twin.weight.SCB),
                        f"{name} {path}: vs transformers",
                    )
                    twins += 1
            # everything else (embeddings, norms, lm_head) as transformers has it
            ref_sd = ref.state_dict()
            others = 0
            for key, value in got.state_dict().items():
                if key in ref_sd and value.dtype == ref_sd[key].dtype and value.is_floating_point():
                    check(torch.equal(value, ref_sd[key]), f"{name} {key}: vs transformers")
                    others += 1
            check(functional == 14, f"{name}: {functional} quantized layers, 14 expected")
            say(
                f"{name}: {functional} quantized layers equal to bitsandbytes.functional, "
                f"{twins} to transformers' model; {others} other floating tensors compared"
                + (f"; 4-bit layout: {', '.join(sorted(layouts))}" if layouts else "")
            )
        with Timer(f"{name}: forward (leanstream's model)"), torch.no_grad():
            a = got(input_ids=ids).logits.float()
        with Timer(f"{name}: forward (transformers' model)"), torch.no_grad():
            b = ref(input_ids=ids).logits.float()
        check(bool(torch.isfinite(a).all()), f"{name}: logits not finite")
        same = torch.equal(a, b)
        check(same, f"{name}: logits differ from transformers'")
        say(
            f"{name}: logits {tuple(a.shape)} finite, equal to transformers': {same} "
            f"(max |diff| {(a - b).abs().max().item():.3g})"
        )
        del got, ref
    if failures:
        say(f"FAILED: {len(failures)} mismatches")
        return 1
    say("OK: NF4 and int8 bit-identical to bitsandbytes on this CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
