"""leanstream.load against the reference: transformers + bitsandbytes from_pretrained."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import pytest
import torch
from cpu_kernel import same_layout, state2
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import leanstream
from leanstream.cpu_layout import is_packed
from leanstream.meta import build_empty_model
from leanstream.progress import format_bytes
from models import make_config, write_model

# the outcome depends on bitsandbytes' CPU 4-bit kernel (tests/cpu_kernel.py)
pytestmark = pytest.mark.cpu_kernel


ARCHS = ["llama", "llama-tied", "opt", "gpt2", "qwen2"]
SETTINGS = {
    "nf4": dict(bits=4, quant_type="nf4", double_quant=False),
    "fp4": dict(bits=4, quant_type="fp4", double_quant=False),
    "nf4-dq": dict(bits=4, quant_type="nf4", double_quant=True),
    "int8": dict(bits=8),
}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {arch: write_model(root / arch, arch) for arch in ARCHS}


def bnb_config(settings: dict[str, Any]) -> BitsAndBytesConfig:
    """transformers' config for a setting of ``SETTINGS``, the quant type always spelled
    out (``load_in_4bit`` alone means fp4), computing in bf16."""
    if settings["bits"] == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=settings["quant_type"],
            bnb_4bit_use_double_quant=settings["double_quant"],
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def reference(folder: Path, settings: dict[str, Any], device_map: str = "cpu") -> Any:
    """transformers + bitsandbytes loading ``folder`` with ``settings``."""
    return AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=bnb_config(settings), device_map=device_map
    ).eval()


def ours(folder: Path, settings: dict[str, Any], **kwargs: Any) -> Any:
    extra = {"compute_dtype": torch.bfloat16} if settings["bits"] == 4 else {}
    return leanstream.load(folder, device="cpu", progress=False, **settings, **extra, **kwargs)


def assert_same_weights(ref: torch.nn.Module, got: torch.nn.Module) -> int:
    """Every module of ``ref`` has its twin in ``got`` with bit-identical tensors."""
    got_modules = dict(got.named_modules())
    quantized = 0
    for name, module in ref.named_modules():
        twin = got_modules[name]
        assert type(twin) is type(module), name
        if isinstance(module, bnb.nn.Linear4bit):
            quantized += 1
            same_layout(module, twin)  # a plain one as its first forward on this CPU leaves it
            a, b = module.weight, twin.weight
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8)), name
            qa, qb = a.quant_state, b.quant_state
            assert (qa.quant_type, qa.blocksize, qa.shape, qa.dtype) == (
                qb.quant_type,
                qb.blocksize,
                qb.shape,
                qb.dtype,
            ), name
            assert torch.equal(qa.absmax, qb.absmax), name
            assert torch.equal(qa.code, qb.code), name
            assert is_packed(qa) == is_packed(qb), name
            assert (state2(qa) is None) == (state2(qb) is None), name
            if state2(qa) is not None:
                assert torch.equal(qa.state2.absmax, qb.state2.absmax), name
                assert torch.equal(qa.state2.code, qb.state2.code), name
                assert torch.equal(qa.offset, qb.offset), name
        elif isinstance(module, bnb.nn.Linear8bitLt):
            quantized += 1
            assert module.weight.dtype == twin.weight.dtype == torch.int8, name
            assert torch.equal(module.weight.data, twin.weight.data), name
            assert torch.equal(module.weight.SCB, twin.weight.SCB), name
        for attr, tensor in module.named_parameters(recurse=False):
            if attr == "weight" and isinstance(module, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt):
                continue
            other = getattr(twin, attr)
            assert other.dtype == tensor.dtype and torch.equal(other, tensor), f"{name}.{attr}"
        for attr, tensor in module.named_buffers(recurse=False):
            other = getattr(twin, attr)
            assert other.dtype == tensor.dtype, f"{name}.{attr}"
            assert torch.equal(other, tensor), f"{name}.{attr}"
    return quantized


def logits(model: Any) -> torch.Tensor:
    ids = torch.tensor([[1, 5, 9, 42, 7, 300, 11, 2]])
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("arch", ARCHS)
def test_bit_identical_to_transformers(
    checkpoints: dict[str, Path], arch: str, setting: str
) -> None:
    folder = checkpoints[arch]
    assert len(list(folder.glob("*.safetensors"))) > 1, "the fixture must be sharded"
    ref = reference(folder, SETTINGS[setting])
    got = ours(folder, SETTINGS[setting])
    assert assert_same_weights(ref, got) > 0
    a, b = logits(ref), logits(got)
    assert torch.isfinite(b).all()
    rel = (a - b).norm() / a.norm()
    assert rel < 1e-2, rel


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_unquantized_matches_transformers(checkpoints: dict[str, Path], arch: str) -> None:
    ref = AutoModelForCausalLM.from_pretrained(checkpoints[arch], device_map="cpu").eval()
    got = leanstream.load(checkpoints[arch], bits=16, device="cpu", progress=False)
    ref_sd, got_sd = ref.state_dict(), got.state_dict()
    assert ref_sd.keys() == got_sd.keys()
    for key, value in ref_sd.items():
        assert got_sd[key].dtype == value.dtype and torch.equal(got_sd[key], value), key
    assert torch.equal(logits(ref), logits(got))
    assert leanstream.load(checkpoints[arch], bits=None, device="cpu", progress=False)


def test_result_is_a_ready_model(checkpoints: dict[str, Path]) -> None:
    model = ours(checkpoints["llama"], SETTINGS["nf4"])
    assert not any(m.training for m in model.modules())
    assert model.is_loaded_in_4bit
    qc = model.config.quantization_config
    assert qc.load_in_4bit and qc.bnb_4bit_quant_type == "nf4"
    assert qc.bnb_4bit_compute_dtype == torch.bfloat16
    assert "lm_head" in qc.llm_int8_skip_modules
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 8)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert tensor.device.type == "cpu" and not tensor.is_meta, name


def test_compute_dtype_defaults_to_checkpoint_dtype(checkpoints: dict[str, Path]) -> None:
    model = leanstream.load(checkpoints["llama"], bits=4, device="cpu", progress=False)
    assert model.config.quantization_config.bnb_4bit_compute_dtype == torch.bfloat16
    assert model.model.layers[0].mlp.up_proj.compute_dtype == torch.bfloat16


def test_tied_weights_stay_tied(checkpoints: dict[str, Path]) -> None:
    model = ours(checkpoints["llama-tied"], SETTINGS["nf4"])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model = ours(checkpoints["opt"], SETTINGS["int8"])
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight


def test_skip_modules_stay_full_precision(checkpoints: dict[str, Path]) -> None:
    skip = ["mlp.down_proj", "model.layers.1"]  # a suffix, and a prefix up to a module boundary
    model = ours(checkpoints["llama"], SETTINGS["nf4"], skip_modules=skip)
    layers = model.model.layers
    assert type(layers[0].mlp.down_proj) is torch.nn.Linear
    assert isinstance(layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    linears = [m for m in layers[1].modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 7 and all(type(m) is torch.nn.Linear for m in linears)
    assert set(skip) <= set(model.config.quantization_config.llm_int8_skip_modules)


def test_rotary_inv_freq_is_real_and_correct(checkpoints: dict[str, Path]) -> None:
    """Regression for transformers #34234 / #45902: inv_freq computed, not garbage."""
    config = make_config("llama", torch.float32)
    reference_model = AutoModelForCausalLM.from_config(config)
    empty = build_empty_model(make_config("llama", torch.float32))
    assert empty.model.layers[0].mlp.up_proj.weight.is_meta
    ref_inv = reference_model.model.rotary_emb.inv_freq
    assert torch.equal(empty.model.rotary_emb.inv_freq, ref_inv)
    loaded = ours(checkpoints["llama"], SETTINGS["nf4"])
    assert not loaded.model.rotary_emb.inv_freq.is_meta
    assert torch.isfinite(loaded.model.rotary_emb.inv_freq).all()
    assert torch.equal(loaded.model.rotary_emb.inv_freq, ref_inv)


class Elsewhere(torch.Tensor):
    """A CPU tensor that says it lives on a GPU, as buffers computed by ``__init__`` on
    the host do when the target is a GPU: a CPU-only machine has no second device to
    put them on. Moving it (``.to``) gives a plain tensor."""

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return torch.device("cuda", 0)

    def to(self, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        return self.as_subclass(torch.Tensor).to(*args, **kwargs).clone()


def _buffers_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    import leanstream.loader

    build = leanstream.loader.build_empty_model

    def build_elsewhere(*args: Any, **kwargs: Any) -> Any:
        model = build(*args, **kwargs)
        for module in model.modules():
            for attr in module._non_persistent_buffers_set:
                module._buffers[attr] = module._buffers[attr].as_subclass(Elsewhere)
        return model

    monkeypatch.setattr(leanstream.loader, "build_empty_model", build_elsewhere)


@pytest.mark.parametrize("pipeline", [False, True])
def test_non_persistent_buffers_are_moved_to_the_target_device(
    checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch, pipeline: bool
) -> None:
    """Rotary ``inv_freq`` and ``original_inv_freq`` are computed on the host, never
    loaded: the loader moves them, like transformers does after loading."""
    _buffers_elsewhere(monkeypatch)
    model = ours(checkpoints["llama"], SETTINGS["nf4"], pipeline=pipeline)
    rotary = model.model.rotary_emb
    want = AutoModelForCausalLM.from_config(make_config("llama")).model.rotary_emb
    for attr in ("inv_freq", "original_inv_freq"):
        got = getattr(rotary, attr)
        assert type(got) is torch.Tensor, attr
        assert torch.equal(got, getattr(want, attr)), attr
    assert torch.isfinite(logits(model)).all()


def test_a_tensor_left_off_the_target_device_is_refused(
    checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import leanstream.loader

    _buffers_elsewhere(monkeypatch)
    monkeypatch.setattr(leanstream.loader, "place_buffers", lambda model, device: None)
    with pytest.raises(leanstream.PlacementError) as err:
        ours(checkpoints["llama"], SETTINGS["nf4"])
    assert err.value.device == torch.device("cpu")
    assert "model.rotary_emb.inv_freq (cuda:0)" in err.value.names
    assert "model.rotary_emb.inv_freq" in str(err.value) and "cpu" in str(err.value)


def test_cpu_with_an_index_is_the_cpu(checkpoints: dict[str, Path]) -> None:
    """Tensors on the CPU report ``cpu``, not ``cpu:0``: the placement check agrees."""
    model = leanstream.load(checkpoints["llama"], device="cpu:0", progress=False)
    assert {p.device for p in model.parameters()} == {torch.device("cpu")}


def test_meta_build_does_not_leak_into_other_threads() -> None:
    """accelerate's patch is global (diffusers #4296): ours acts in one thread only."""
    inside = threading.Event()
    done = threading.Event()
    seen: dict[str, Any] = {}

    def other() -> None:
        # the build is in progress (a minute is a hang): a Linear made now, outside it
        seen["waited"] = inside.wait(60)
        seen["device"] = torch.nn.Linear(3, 3).weight.device.type
        done.set()

    from leanstream.meta import empty_parameters

    thread = threading.Thread(target=other)
    thread.start()
    with empty_parameters():
        assert torch.nn.Linear(3, 3).weight.is_meta
        inside.set()
        assert done.wait(60), "the other thread hangs"
    thread.join()
    assert seen == {"waited": True, "device": "cpu"}
    assert not torch.nn.Linear(3, 3).weight.is_meta


def test_two_loads_in_two_threads(checkpoints: dict[str, Path]) -> None:
    results: dict[str, Any] = {}
    errors: list[BaseException] = []

    def run(arch: str) -> None:
        try:
            results[arch] = ours(checkpoints[arch], SETTINGS["nf4"])
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(a,)) for a in ("llama", "qwen2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for arch in ("llama", "qwen2"):
        ref = ours(checkpoints[arch], SETTINGS["nf4"])
        assert assert_same_weights(ref, results[arch]) > 0


def test_two_loads_of_one_checkpoint_while_a_third_thread_streams_it(
    checkpoints: dict[str, Path],
) -> None:
    """Mappings, read-ahead threads and the meta build belong to each load: the same
    folder loads in two threads while a third reads it with the raw reader."""
    from safetensors.torch import load_file

    from leanstream.reader import as_tensor

    folder = checkpoints["llama"]
    results: dict[int, Any] = {}
    streamed: dict[str, torch.Tensor] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(3)

    def load(i: int) -> None:
        try:
            start.wait(30)
            results[i] = ours(folder, SETTINGS["nf4"])
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    def stream() -> None:
        try:
            start.wait(30)
            for _ in range(3):
                with (
                    leanstream.Checkpoint(folder) as ckpt,
                    ckpt.stream(ckpt.keys(), window=16 << 10) as tensors,
                ):
                    for name, view in tensors:
                        streamed[name] = as_tensor(view).clone()
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(2)]
    threads.append(threading.Thread(target=stream))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    ref = ours(folder, SETTINGS["nf4"])
    for i in range(2):
        assert assert_same_weights(ref, results[i]) > 0
    expected = {k: v for f in folder.glob("*.safetensors") for k, v in load_file(f).items()}
    assert streamed.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(streamed[name], tensor), name


def test_footprint_reports_the_saving(checkpoints: dict[str, Path]) -> None:
    full = leanstream.footprint(
        leanstream.load(checkpoints["opt"], bits=16, device="cpu", progress=False)
    )
    four = leanstream.footprint(ours(checkpoints["opt"], SETTINGS["nf4"]))
    assert set(full.by_kind) == {"bfloat16"} | ({"int64"} & set(full.by_kind))
    assert "nf4" in four.by_kind and "quant_state" in four.by_kind
    assert four.total_bytes < full.total_bytes
    assert str(four).startswith(format_bytes(four.total_bytes) + " (")


def test_footprint_counts_linear_bytes() -> None:
    assert leanstream.footprint(torch.nn.Linear(1000, 1000)).total_bytes == 4_004_000


# --- errors ---------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _rewrite_shard(
    folder: Path, drop: str | None = None, add: dict[str, torch.Tensor] | None = None
) -> None:
    """Rewrite the shard holding ``drop`` without it (and with ``add``), fixing the index."""
    from safetensors.torch import load_file, save_file

    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = index["weight_map"][drop] if drop else sorted(set(index["weight_map"].values()))[0]
    tensors = load_file(folder / shard)
    if drop:
        del tensors[drop]
        del index["weight_map"][drop]
    for name, value in (add or {}).items():
        tensors[name] = value
        index["weight_map"][name] = shard
    save_file(tensors, folder / shard, metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))


def test_missing_tensor_is_refused(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(checkpoints["llama"], tmp_path / "m")
    _rewrite_shard(folder, drop="model.layers.1.mlp.up_proj.weight")
    with pytest.raises(
        leanstream.MismatchError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"
    ) as err:
        ours(folder, SETTINGS["nf4"])
    assert err.value.missing == ["model.layers.1.mlp.up_proj.weight"]


def test_unexpected_tensor_is_refused(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(checkpoints["llama"], tmp_path / "m")
    _rewrite_shard(folder, add={"model.layers.0.extra.weight": torch.zeros(3)})
    with pytest.raises(leanstream.MismatchError, match=r"model\.layers\.0\.extra\.weight") as err:
        ours(folder, SETTINGS["nf4"])
    assert err.value.unexpected == ["model.layers.0.extra.weight"]


def test_shape_mismatch_is_refused(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(checkpoints["llama"], tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 128
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        leanstream.MismatchError,
        match=r"up_proj\.weight \(checkpoint \[192, 64\], model \[128, 64\]\)",
    ):
        ours(folder, SETTINGS["nf4"])


def test_index_pointing_at_wrong_shard_is_refused(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    folder = _copy(checkpoints["llama"], tmp_path / "m")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(n for n, s in index["weight_map"].items() if s == shards[0])
    index["weight_map"][name] = shards[1]
    index_path.write_text(json.dumps(index))
    with pytest.raises(leanstream.IndexMismatchError, match=name.replace(".", r"\.")):
        ours(folder, SETTINGS["nf4"])


def test_config_errors(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(checkpoints["llama"], tmp_path / "m")
    (folder / "config.json").unlink()
    with pytest.raises(leanstream.ConfigError, match=r"config\.json"):
        ours(folder, SETTINGS["nf4"])
    (folder / "config.json").write_text("{not json")
    with pytest.raises(leanstream.ConfigError, match="invalid JSON"):
        ours(folder, SETTINGS["nf4"])
    (folder / "config.json").write_text('{"model_type": "no-such-model"}')
    with pytest.raises(leanstream.ConfigError):
        ours(folder, SETTINGS["nf4"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(bits=3), "bits"),
        (dict(bits=4, quant_type="nf3"), "quant_type"),
        (dict(bits=4, blocksize=48), "blocksize"),
        (dict(bits=4, dtype="int8"), "dtype"),
        (dict(bits=4, compute_dtype="nope"), "compute_dtype"),
        (dict(bits=4, device="meta"), "meta"),
    ],
)
def test_bad_options(checkpoints: dict[str, Path], kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(leanstream.ConfigError, match=match):
        leanstream.load(checkpoints["llama"], progress=False, **{"device": "cpu", **kwargs})


def test_pickle_only_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(leanstream.UnsupportedCheckpointError, match="pickle"):
        leanstream.load(tmp_path, device="cpu", progress=False)


def test_non_bitsandbytes_prequantized_checkpoint_is_refused(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """bitsandbytes pre-quantized checkpoints load (tests/test_prequantized.py); others do not."""
    folder = _copy(checkpoints["llama"], tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(leanstream.UnsupportedCheckpointError, match=r"already quantized \(awq\)"):
        leanstream.load(folder, device="cpu", progress=False)


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(leanstream.FileNotFoundCheckpointError):
        leanstream.load(tmp_path / "nope", device="cpu", progress=False)


def logits_on(model: Any, device: str) -> torch.Tensor:
    ids = torch.tensor([[1, 5, 9, 42, 7, 300, 11, 2]], device=device)
    with torch.no_grad():
        return model(input_ids=ids).logits.float().cpu()


def test_checkpoint_of_the_base_model_gets_its_prefix(tmp_path: Path) -> None:
    """Keys saved without ``model.`` (a LlamaModel checkpoint) are renamed as transformers does."""
    from transformers import LlamaModel

    config = make_config("llama-tied")
    base = LlamaModel(config).to(torch.bfloat16)
    base.save_pretrained(tmp_path / "base", max_shard_size="40KB")
    index = json.loads((tmp_path / "base" / "model.safetensors.index.json").read_text())
    assert "embed_tokens.weight" in index["weight_map"]
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "base", device_map="cpu")
    # its architectures names LlamaModel, the default class: ask for the causal LM
    got = leanstream.load(
        tmp_path / "base",
        bits=16,
        device="cpu",
        progress=False,
        model_class=AutoModelForCausalLM,
    )
    assert type(got).__name__ == "LlamaForCausalLM"
    assert torch.equal(got.model.embed_tokens.weight, base.embed_tokens.weight)
    assert got.lm_head.weight is got.model.embed_tokens.weight
    assert torch.equal(logits(ref), logits(got))


def test_progress_bar_counts_bytes(
    checkpoints: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    leanstream.load(checkpoints["llama"], bits=4, device="cpu", progress=True)
    err = capsys.readouterr().err
    assert "leanstream llama" in err and "B/s" in err
    leanstream.load(checkpoints["llama"], bits=4, device="cpu", progress=False)
    assert "leanstream" not in capsys.readouterr().err


def test_the_garbage_collector_is_paused_during_a_load_only(
    sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No cyclic garbage collection while a load runs; afterwards (also after an error)
    the collector is as the caller had it."""
    import gc

    import leanstream.loader

    seen: list[bool] = []
    fill = leanstream.loader._fill

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(gc.isenabled())
        if len(seen) == 2:
            raise RuntimeError("a load that fails half-way")
        return fill(*args, **kwargs)

    monkeypatch.setattr(leanstream.loader, "_fill", spy)
    assert gc.isenabled()
    leanstream.load(sources["llama"], device="cpu", progress=False)
    assert seen == [False] and gc.isenabled()
    with pytest.raises(RuntimeError, match="half-way"):
        leanstream.load(sources["llama"], device="cpu", progress=False)
    assert seen == [False, False] and gc.isenabled()
    gc.disable()
    try:
        leanstream.load(sources["llama"], device="cpu", progress=False)
        assert not gc.isenabled()  # left off, as it was
    finally:
        gc.enable()
