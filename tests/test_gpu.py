"""leanstream on a CUDA device, against transformers + bitsandbytes on the same device.

Only runs where CUDA is available (every test is marked ``gpu``; conftest skips
them otherwise). What it covers:

- bit-identity with transformers for nf4, nf4 + double quant, fp4 and LLM.int8,
  on a llama whose tensors (up to 64 MiB) span many slots of a small ring;
- the same with every copy and every hand-over delayed on the GPU
  (``torch.cuda._sleep``), in the current stream and inside a user's stream: an
  early slot release, a missing wait or a device buffer reused before the
  quantization that reads it ran then corrupts the result;
- the device memory peak: the final model plus the largest tensor, and a
  caching allocator that holds no second copy of it;
- no host synchronization per tensor in a pipelined load (``set_sync_debug_mode``),
  from a full-precision and from a pre-quantized checkpoint;
- forward and greedy ``generate`` equal to transformers' (tied ``lm_head``), and
  with quantized embeddings equal to the mapped load's;
- every parameter, buffer and quantization statistic on the device after the load,
  rotary ``inv_freq`` as transformers computes it.

Most of its time goes into writing a 549 MiB checkpoint once and loading it once
per setting with transformers (the references are kept for the session).
"""

from __future__ import annotations

import collections
import gc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import pytest
import torch
from test_load import SETTINGS, assert_same_weights, reference
from transformers import AutoModelForCausalLM

import leanstream
import leanstream.loader
import leanstream.pipeline
import leanstream.prequantized
from leanstream.pipeline import CudaCopies
from models import make_config, write_model

MIB = 1 << 20
#: 16 slots of 1 MiB: a 64 MiB tensor is 64 chunks, and the ring wraps ~34 times per load
SMALL_RING = 16 * MIB
#: The same for the tiny models (16 slots of 1000 bytes: chunks cut rows anywhere)
TINY_RING = 16 * 1000
#: ``torch.cuda._sleep`` cycles (0.5 ns each at the ~2 GHz of a busy H100/H200) queued on
#: the copy stream before each 1 MiB chunk's copy: ~200 µs, several times what the host
#: takes per chunk, so the GPU falls behind and the ring stays full (the host then runs
#: ~16 chunks, ~3.5 ms, ahead of the copies). ~550 chunks: ~0.1 s a load.
COPY_SLEEP = 400_000
#: ... and on the compute stream after each hand-over (21 a load): ~1 ms, longer than
#: one chunk (so a buffer handed to the next tensor's copies too early is overwritten
#: before its quantization reads it) and shorter than the ~3.5 ms the copies lag (so a
#: quantization that does not wait for its tensor's last copy reads it unfinished).
HAND_OVER_SLEEP = 2_000_000
IDS = [[1, 5, 9, 42, 7, 300, 11, 2]]

pytestmark = pytest.mark.gpu


# --- fixtures --------------------------------------------------------------------------


@dataclass(frozen=True)
class Big:
    """A llama with hidden size 4096: 21 tensors, 549 MiB, the MLP weights 64 MiB each."""

    folder: Path
    largest: int  # bytes of the largest tensor
    total: int  # bytes of all tensors
    tensors: int


@pytest.fixture(scope="session")
def big(tmp_path_factory: pytest.TempPathFactory) -> Big:
    folder = write_model(
        tmp_path_factory.mktemp("gpu") / "llama-4k",
        "llama",
        max_shard_size="256MB",
        hidden_size=4096,
        intermediate_size=8192,
        num_attention_heads=32,
        num_key_value_heads=8,
    )
    with leanstream.Checkpoint(folder) as ckpt:
        sizes = [ckpt[key].nbytes for key in ckpt.keys()]
    assert len(list(folder.glob("*.safetensors"))) > 1, "the fixture must be sharded"
    assert max(sizes) >= 64 * MIB
    return Big(folder, max(sizes), sum(sizes), len(sizes))


@pytest.fixture(scope="session")
def references(big: Big) -> Iterator[Callable[[str], Any]]:
    """transformers' model of ``big`` on CUDA for a setting of ``SETTINGS``, made once."""
    made: dict[str, Any] = {}

    def made_once(setting: str) -> Any:
        if setting not in made:
            made[setting] = transformers_on_cuda(big.folder, SETTINGS[setting])
        return made[setting]

    yield made_once
    made.clear()


@pytest.fixture(scope="session")
def prequantized(
    references: Callable[[str], Any], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """``big`` quantized by transformers on CUDA and saved by its ``save_pretrained``."""
    root = tmp_path_factory.mktemp("gpu-saved")
    folders = {}
    for setting in ("nf4-dq", "int8"):
        folders[setting] = root / setting
        references(setting).save_pretrained(folders[setting], max_shard_size="100MB")
    return folders


# --- helpers ---------------------------------------------------------------------------


def transformers_on_cuda(folder: Path, settings: dict[str, Any]) -> Any:
    """The reference: ``from_pretrained`` with the same quantization, on ``cuda:0``."""
    return reference(folder, settings, device_map="cuda:0")


def ours(folder: Path, settings: dict[str, Any], **kwargs: Any) -> Any:
    """leanstream onto CUDA, compute dtype bf16 as in the reference."""
    extra = {"compute_dtype": torch.bfloat16} if settings.get("bits") == 4 else {}
    return leanstream.load(folder, device="cuda", progress=False, **settings, **extra, **kwargs)


def assert_same(ref: Any, got: Any) -> None:
    """Bit-identical weights, statistics and buffers, both ways round (on the device:
    ``torch.equal`` refuses tensors on two devices)."""
    count = assert_same_weights(ref, got)
    assert count > 0
    assert assert_same_weights(got, ref) == count


def device_tensors(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor a forward reads: parameters, buffers (non-persistent ones too) and
    the bitsandbytes statistics kept beside the weights."""
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None:
            yield f"{name}.weight.absmax", state.absmax
            yield f"{name}.weight.quant_map", state.code
            if state.nested:
                yield f"{name}.weight.nested_absmax", state.state2.absmax
                yield f"{name}.weight.nested_quant_map", state.state2.code
                yield f"{name}.weight.offset", state.offset
        if getattr(weight, "SCB", None) is not None:
            yield f"{name}.SCB", weight.SCB
        matmul = getattr(module, "state", None)  # Linear8bitLt's MatmulLtState
        if isinstance(matmul, bnb.MatmulLtState):
            for attr in ("CB", "SCB"):
                if getattr(matmul, attr) is not None:
                    yield f"{name}.state.{attr}", getattr(matmul, attr)


def assert_on_cuda(model: Any) -> list[str]:
    """Every tensor of ``model`` on the current CUDA device; returns their names."""
    index = torch.cuda.current_device()
    names = []
    for name, tensor in device_tensors(model):
        assert tensor.device.type == "cuda" and tensor.device.index == index, (
            f"{name} is on {tensor.device}"
        )
        names.append(name)
    return names


def cuda_logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS, device="cuda")).logits.float()


def greedy(model: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Eight greedy tokens (end of sequence held off, so that each is a decode step
    through the KV cache and the single-token kernels), and the raw logits of each step."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor(IDS, device="cuda"),
            max_new_tokens=8,
            min_new_tokens=8,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    assert out.sequences.shape == (1, len(IDS[0]) + 8)
    return out.sequences, torch.stack(out.logits).float()


class Sleepy(CudaCopies):
    """:class:`CudaCopies` whose GPU work runs late: a spin kernel before each copy
    (on the copy stream) and after each hand-over (on the compute stream, so ahead
    of the quantization that reads the tensor). The host races ahead, and whatever
    it frees or reuses before the GPU is done shows up in the result."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.copies = self.hand_overs = 0

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> Any:
        self.copies += 1
        with torch.cuda.stream(self.stream):
            torch.cuda._sleep(COPY_SLEEP)
        return super().copy(dst, src)

    def hand_over(self, flat: torch.Tensor, last: Any) -> None:
        self.hand_overs += 1
        super().hand_over(flat, last)
        with torch.cuda.stream(self.compute):
            torch.cuda._sleep(HAND_OVER_SLEEP)


def forbid_host_syncs(monkeypatch: pytest.MonkeyPatch) -> collections.Counter[str]:
    """Make any synchronizing CUDA call an error from the first tensor a sink gets
    (``materialize``, or ``Prequantized.materialize`` for pre-quantized weights) to
    the pipeline's ``finish`` (whose end of stream may wait for the copies). The
    caller resets the mode in a ``finally``. Returns the calls seen, by sink."""
    calls: collections.Counter[str] = collections.Counter()
    materialize = leanstream.loader.materialize
    materialize_prequantized = leanstream.prequantized.Prequantized.materialize
    finish = leanstream.loader._Pipelined.finish

    def arm() -> None:
        if not calls["finish"]:
            torch.cuda.set_sync_debug_mode("error")

    def checked_materialize(*args: Any, **kwargs: Any) -> Any:
        calls["materialize"] += 1
        arm()
        return materialize(*args, **kwargs)

    def checked_prequantized(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls["prequantized"] += 1
        arm()
        return materialize_prequantized(self, *args, **kwargs)

    def unchecked_finish(self: Any) -> Any:
        calls["finish"] += 1
        torch.cuda.set_sync_debug_mode(0)
        return finish(self)

    monkeypatch.setattr(leanstream.loader, "materialize", checked_materialize)
    monkeypatch.setattr(leanstream.prequantized.Prequantized, "materialize", checked_prequantized)
    monkeypatch.setattr(leanstream.loader._Pipelined, "finish", unchecked_finish)
    return calls


def mib(nbytes: int) -> str:
    return f"{nbytes / MIB:.1f} MiB"


# --- bit-identity on the device ----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["nf4", "nf4-dq", "fp4", "int8"])
def test_pipelined_load_is_bit_identical_to_transformers(
    big: Big, references: Callable[[str], Any], setting: str
) -> None:
    """Packed bytes, absmax, nested statistics, quant_map, SCB, through a 16 MiB ring."""
    got = ours(big.folder, SETTINGS[setting], pipeline=True, ring_bytes=SMALL_RING)
    assert_same(references(setting), got)


@pytest.mark.slow
@pytest.mark.parametrize("budget", ["default", "unlimited"])
@pytest.mark.parametrize("where", ["current-stream", "user-stream"])
@pytest.mark.parametrize("setting", ["nf4", "int8"])
def test_late_gpu_work_cannot_corrupt_the_load(
    big: Big,
    references: Callable[[str], Any],
    monkeypatch: pytest.MonkeyPatch,
    setting: str,
    where: str,
    budget: str,
) -> None:
    """With every copy and quantization delayed on the GPU, the host gets far ahead:
    a slot handed back to the readers before its copy ran, a quantization not made to
    wait for its tensor's last copy (or queued on another stream than the one that
    waited: bitsandbytes' 4-bit kernels run on the default stream, whatever stream is
    current), or a device buffer given to a new copy while the quantization reading
    it is still queued, all change the bytes. Inside a user's stream too. With an
    unlimited device budget nothing but the streams' waits orders a new buffer after the
    work that last used its memory (the default budget would hide a missing one)."""
    made: list[Sleepy] = []
    if budget == "unlimited":

        class Unlimited(leanstream.pipeline.DeviceStream):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **{**kwargs, "device_budget": 1 << 50})

        monkeypatch.setattr(leanstream.loader, "DeviceStream", Unlimited)

    def sleepy(device: torch.device) -> Sleepy:
        made.append(Sleepy(device))
        return made[-1]

    monkeypatch.setattr(leanstream.pipeline, "copies_for", sleepy)
    if where == "user-stream":
        with torch.cuda.stream(torch.cuda.Stream()):
            got = ours(big.folder, SETTINGS[setting], pipeline=True, ring_bytes=SMALL_RING)
    else:
        got = ours(big.folder, SETTINGS[setting], pipeline=True, ring_bytes=SMALL_RING)
    torch.cuda.synchronize()
    assert len(made) == 1, "the load must take its copier from pipeline.copies_for"
    assert made[0].copies >= big.total // (SMALL_RING // 16)
    assert made[0].hand_overs == big.tensors
    assert_same(references(setting), got)


# --- device memory -----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["nf4", "int8"])
def test_gpu_peak_is_the_model_plus_two_tensors(big: Big, setting: str) -> None:
    """Full-precision tensors in flight are capped at the two largest consecutive ones
    (the one quantized and the next, copied meanwhile: at most twice the largest), and the
    caching allocator keeps no second pool (a side stream's) holding a freed copy of one."""
    gc.collect()  # models of earlier tests, in reference cycles, are not freed mid-load
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    model = ours(big.folder, SETTINGS[setting], pipeline=True)
    torch.cuda.synchronize()
    gc.collect()
    final = torch.cuda.memory_allocated() - allocated
    peak = torch.cuda.max_memory_allocated() - allocated
    reserved_peak = torch.cuda.max_memory_reserved() - reserved
    assert model is not None and final > 0
    numbers = (
        f"{setting}: allocated peak growth {mib(peak)}, final model {mib(final)}, "
        f"largest tensor {mib(big.largest)}, reserved peak growth {mib(reserved_peak)}"
    )
    assert peak <= final + 2 * big.largest + 2 * MIB, numbers
    assert reserved_peak <= peak + big.largest, numbers


# --- no host synchronization per tensor --------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["nf4", "nf4-dq", "fp4", "int8"])
def test_pipelined_load_never_waits_on_the_gpu_per_tensor(
    big: Big, references: Callable[[str], Any], monkeypatch: pytest.MonkeyPatch, setting: str
) -> None:
    """A ``.item()``, a copy from pageable memory, ``torch.tensor(list, device=cuda)``
    in the loop raises (slot and budget waits are event waits, which do not count)."""
    calls = forbid_host_syncs(monkeypatch)
    try:
        got = ours(big.folder, SETTINGS[setting], pipeline=True, ring_bytes=SMALL_RING)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert calls["materialize"] > 0 and calls["finish"] == 1, calls
    assert_same(references(setting), got)


@pytest.mark.parametrize("setting", ["nf4", "nf4-dq", "int8"])
def test_pipelined_experts_load_never_waits_on_the_gpu_per_tensor(
    moe_folder: Path, monkeypatch: pytest.MonkeyPatch, setting: str
) -> None:
    """Mixture-of-experts weights, streamed expert by expert into one quantized tensor
    on the device: no host wait either."""
    calls = forbid_host_syncs(monkeypatch)
    try:
        got = ours(moe_folder, SETTINGS[setting], pipeline=True, ring_bytes=TINY_RING)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert calls["materialize"] > 0 and calls["finish"] == 1, calls
    assert_on_cuda(got)


@pytest.mark.parametrize("setting", ["nf4", "int8"])
def test_a_gpu_cpu_split_never_waits_on_the_gpu_per_tensor(
    sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch, setting: str
) -> None:
    """A ``device_map`` split: the GPU part is pipelined without a host wait (the CPU
    part, quantized on the host, makes no CUDA call)."""
    from test_device_map import quantized_meta, sizes_of

    from leanstream.quantize import QuantSpec

    spec = QuantSpec(bits=SETTINGS[setting]["bits"])
    sizes = sizes_of(quantized_meta("llama", spec), spec)
    gpu_share = sum(v for k, v in sizes.items() if not k.startswith("model.layers.1"))
    extra = {"compute_dtype": torch.bfloat16} if SETTINGS[setting]["bits"] == 4 else {}
    calls = forbid_host_syncs(monkeypatch)
    try:
        got = leanstream.load(
            sources["llama"],
            progress=False,
            pipeline=True,
            ring_bytes=TINY_RING,
            device_map="sequential",
            max_memory={0: gpu_share + 4096, "cpu": "1GiB"},
            **SETTINGS[setting],
            **extra,
        )
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert set(got.hf_device_map.values()) == {0, "cpu"}, got.hf_device_map
    assert calls["materialize"] > 0 and calls["finish"] >= 1, calls


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["nf4-dq", "int8"])
def test_pipelined_prequantized_load_never_waits_on_the_gpu_per_tensor(
    prequantized: dict[str, Path],
    references: Callable[[str], Any],
    monkeypatch: pytest.MonkeyPatch,
    setting: str,
) -> None:
    """Statistics (the JSON quant state, ``weight_format``) are read on the host, and
    what goes to the device goes without a host wait."""
    calls = forbid_host_syncs(monkeypatch)
    try:
        got = leanstream.load(
            prequantized[setting],
            device="cuda",
            progress=False,
            pipeline=True,
            ring_bytes=SMALL_RING,
        )
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert calls["prequantized"] > 0 and calls["finish"] == 1, calls
    assert_same(references(setting), got)


# --- forward and generate -----------------------------------------------------------------


@pytest.mark.parametrize("setting", ["nf4", "int8"])
def test_tied_model_runs_as_transformers_does(sources: dict[str, Path], setting: str) -> None:
    """Same weights, same kernels, same shapes on one GPU: the logits are equal bit for
    bit (cuBLAS, SDPA and bitsandbytes' kernels are deterministic for a given shape;
    anything but a model difference would be a tolerance to pick), and so are the
    greedy tokens and each decode step's logits. A forward after all that equals the
    first (the first changed no state the next ones read)."""
    folder = sources["llama-tied"]
    ref = transformers_on_cuda(folder, SETTINGS[setting])
    got = ours(folder, SETTINGS[setting], pipeline=True, ring_bytes=TINY_RING)
    assert got.lm_head.weight is got.model.embed_tokens.weight
    attention = (got.config._attn_implementation, ref.config._attn_implementation)
    assert attention[0] == attention[1], attention
    first = cuda_logits(got)
    assert torch.isfinite(first).all()
    assert torch.equal(first, cuda_logits(ref))
    tokens, steps = greedy(got)
    assert torch.isfinite(steps).all()
    theirs = greedy(ref)
    assert torch.equal(tokens, theirs[0])
    assert torch.equal(steps, theirs[1])
    assert torch.equal(cuda_logits(got), first)


@pytest.mark.parametrize("setting", ["nf4", "int8"])
def test_quantized_embeddings_run_on_the_gpu(sources: dict[str, Path], setting: str) -> None:
    """Embedding and tied lm_head quantized (one shared tensor): no transformers
    reference exists, so the pipelined load is held to the mapped one."""
    folder = sources["llama-tied"]
    flags = dict(quantize_embeddings=True, quantize_lm_head=True)
    piped = ours(folder, SETTINGS[setting], **flags, pipeline=True, ring_bytes=TINY_RING)
    mapped = ours(folder, SETTINGS[setting], **flags, pipeline=False)
    for model in (piped, mapped):
        head, embed = model.get_output_embeddings(), model.get_input_embeddings()
        assert isinstance(embed, bnb.nn.Embedding4bit | bnb.nn.Embedding8bit)
        assert isinstance(head, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt)
        assert head.weight is embed.weight
    assert_on_cuda(piped)
    assert_same(mapped, piped)
    first = cuda_logits(piped)
    assert torch.isfinite(first).all()
    assert torch.equal(first, cuda_logits(mapped))
    tokens, steps = greedy(piped)
    assert torch.isfinite(steps).all()
    theirs = greedy(mapped)
    assert torch.equal(tokens, theirs[0])
    assert torch.equal(steps, theirs[1])
    assert torch.equal(cuda_logits(piped), first)


# --- where the tensors are ------------------------------------------------------------------


@pytest.mark.parametrize("pipeline", [True, False], ids=["pipelined", "mapped"])
@pytest.mark.parametrize("setting", ["nf4-dq", "int8"])
def test_every_tensor_is_on_the_device(
    sources: dict[str, Path], setting: str, pipeline: bool
) -> None:
    """Parameters, buffers (rotary ``inv_freq`` is non-persistent: never in the
    checkpoint) and statistics; ``inv_freq`` as a normally built model computes it."""
    model = ours(sources["llama"], SETTINGS[setting], pipeline=pipeline, ring_bytes=TINY_RING)
    names = assert_on_cuda(model)
    assert "model.rotary_emb.inv_freq" in names
    assert "model.layers.0.mlp.up_proj.weight.absmax" in names or setting == "int8"
    assert "model.layers.0.mlp.up_proj.SCB" in names or setting != "int8"
    expected = AutoModelForCausalLM.from_config(make_config("llama", torch.float32))
    rotary = dict(model.model.rotary_emb.named_buffers())
    for name, value in expected.model.rotary_emb.named_buffers():
        assert rotary[name].dtype == value.dtype, name
        assert torch.equal(rotary[name].cpu(), value), name


# --- mixture-of-experts ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("gpu-moe") / "mixtral"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(make_config("mixtral"), dtype=torch.bfloat16).save_pretrained(
        folder, max_shard_size="60KB"
    )
    return folder


@pytest.mark.parametrize("setting", ["nf4", "nf4-dq", "int8"])
def test_moe_experts_are_quantized_on_the_gpu(moe_folder: Path, setting: str) -> None:
    """Experts streamed piece by piece and quantized on the device with bitsandbytes' CUDA
    ops: bit-identical to bitsandbytes quantizing transformers' merged tensor on CUDA; the
    logits those of transformers' model computing with the same quantized experts (made on
    the CPU: CPU and GPU kernels round differently, hence the tolerance of the CPU test)."""
    from test_moe import (
        IDS,
        bnb_quantized,
        dequantized_reference,
        expert_weights,
        merged_reference,
        ours_as_dict,
    )

    folder = moe_folder
    got = ours(folder, SETTINGS[setting], pipeline=True, ring_bytes=TINY_RING)
    assert_on_cuda(got)
    for name, weight in expert_weights(merged_reference(folder)).items():
        expected = bnb_quantized(weight.cuda(), SETTINGS[setting])
        actual = ours_as_dict(got.get_parameter(name))
        for key, value in expected.items():
            assert torch.equal(actual[key].reshape(value.shape), value), (name, key)
    ref = dequantized_reference(folder, SETTINGS[setting])
    with torch.no_grad():
        a = ref(input_ids=IDS).logits.float()
        b = got(input_ids=IDS.cuda()).logits.float().cpu()
    assert torch.isfinite(b).all()
    assert torch.allclose(a, b, rtol=0, atol=2e-2 * a.abs().max().item()), (a - b).abs().max()
    out = got.generate(IDS.cuda(), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, IDS.shape[1] + 4)


@pytest.mark.parametrize("setting", ["nf4", "nf4-dq", "int8"])
def test_moe_experts_run_through_bitsandbytes_kernels_on_cuda(
    moe_folder: Path, setting: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CUDA each routed expert goes through bitsandbytes' own matmul (``matmul_4bit``,
    its GEMV for a decode step; LLM.int8) on its share of the storage: no expert is
    dequantized. A model loaded on the CPU, run there (on an AVX512-BF16 CPU its experts
    take the CPU kernel's layout) and moved with ``.to("cuda")`` computes the same there."""
    from leanstream.experts import QuantizedExperts

    ids = torch.tensor([[1, 5, 9, 42, 7, 100, 11, 2]])
    on_cpu = leanstream.load(moe_folder, device="cpu", progress=False, **SETTINGS[setting])
    with torch.no_grad():
        expected = on_cpu(input_ids=ids).logits.float()
    moved = on_cpu.to("cuda")
    experts = [p for p in moved.parameters() if isinstance(p, QuantizedExperts)]
    assert experts and all(p.device.type == "cuda" and not p.cpu_layout for p in experts)

    def refuse(self: QuantizedExperts, index: Any) -> torch.Tensor:
        raise AssertionError("an expert was dequantized")

    monkeypatch.setattr(QuantizedExperts, "__getitem__", refuse)
    with torch.no_grad():
        got = moved(input_ids=ids.cuda()).logits.float().cpu()
        out = moved.generate(ids.cuda(), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4)
    rel = (got - expected).norm() / expected.norm()
    assert rel < 2e-2, rel  # the GPU's kernels: the same weights, other sums


@pytest.mark.parametrize("double_quant", [False, True])
def test_a_cpu_load_moved_to_the_gpu_runs_there(
    sources: dict[str, Path], double_quant: bool
) -> None:
    """A model loaded on the CPU (on an AVX512-BF16 CPU: in bitsandbytes' fused CPU
    layout) and moved with ``.to("cuda")`` or ``.cuda()`` gives the logits of the same
    model loaded on the GPU with the same scales: its layers take the plain layout back
    before their first forward there (bitsandbytes' own ``.cuda()`` inverse leaves the
    scales transposed; ``.to()`` none at all)."""
    from leanstream import cpu_layout

    ids = torch.tensor(IDS)
    for move in (lambda m: m.to("cuda"), lambda m: m.cuda()):
        model = leanstream.load(
            sources["llama"], bits=4, double_quant=double_quant, device="cpu", progress=False
        )
        with torch.no_grad():
            expected = model(input_ids=ids).logits.float()  # the CPU layout, if any, made
        layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        packed = [cpu_layout.is_packed(m.weight.quant_state) for m in layers]
        model = move(model)
        with torch.no_grad():
            got = model(input_ids=ids.cuda()).logits.float().cpu()
        assert not any(cpu_layout.is_packed(m.weight.quant_state) for m in layers)
        assert all(m.weight.quant_state.absmax.dim() == 1 for m in layers if not double_quant)
        assert torch.isfinite(got).all()
        rel = (got - expected).norm() / expected.norm()
        assert rel < 2e-2, (packed, rel)  # the GPU's kernel: the same weights, other sums
