"""``device_map`` / ``max_memory``: plans made by accelerate on the quantized meta model,
loads that follow them, and plans that cannot work refused before a byte is read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from cpu_kernel import packs
from test_load import SETTINGS, assert_same_weights, logits

import leanstream
from leanstream import ConfigError, placement
from leanstream.experts import QuantizedExperts
from leanstream.footprint import footprint
from leanstream.meta import build_empty_model
from leanstream.quantize import QuantSpec, default_skip_modules, replace_linears
from models import make_config, write_model

# the outcome depends on bitsandbytes' CPU 4-bit kernel (tests/cpu_kernel.py)
pytestmark = pytest.mark.cpu_kernel


def load(folder: Path, setting: str = "nf4", **kwargs: Any) -> Any:
    settings = SETTINGS[setting]
    extra = {"compute_dtype": torch.bfloat16} if settings["bits"] == 4 else {}
    return leanstream.load(folder, progress=False, **settings, **extra, **kwargs)


@pytest.mark.parametrize("setting", ["nf4", "int8"])
@pytest.mark.parametrize(
    "device_map",
    [
        "auto",
        "balanced",
        "sequential",
        {"": "cpu"},
        {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu", "": "cpu"},
    ],
    ids=["auto", "balanced", "sequential", "root", "modules"],
)
def test_cpu_plans_load_as_device_cpu(
    sources: dict[str, Path], device_map: Any, setting: str
) -> None:
    ref = load(sources["llama"], setting, device="cpu")
    got = load(sources["llama"], setting, device_map=device_map)
    assert assert_same_weights(ref, got) > 0
    assert torch.equal(logits(ref), logits(got))
    assert not hasattr(got, "hf_device_map")  # one device: as transformers, no dispatch
    ids = torch.tensor([[1, 5, 9, 42]])
    assert torch.equal(
        got.generate(input_ids=ids, max_new_tokens=4, do_sample=False),
        ref.generate(input_ids=ids, max_new_tokens=4, do_sample=False),
    )


def test_max_memory_on_the_cpu(sources: dict[str, Path]) -> None:
    got = load(sources["llama"], device_map="auto", max_memory={"cpu": "1GiB"})
    assert {p.device.type for p in got.parameters()} == {"cpu"}


def test_load_into_follows_a_device_map(sources: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    config = make_config("llama")
    got = leanstream.load_into(
        lambda: AutoModelForCausalLM.from_config(config),
        sources["llama"],
        bits=4,
        device_map="auto",
        progress=False,
    )
    assert {p.device.type for p in got.parameters()} == {"cpu"} and got.is_loaded_in_4bit


def quantized_meta(arch: str, spec: QuantSpec) -> Any:
    model = build_empty_model(make_config(arch))
    replace_linears(model, spec, default_skip_modules(model))
    return model


def sizes_of(model: Any, spec: QuantSpec) -> dict[str, int]:
    return placement.tensor_sizes(model, spec, lambda module, attr, t: torch.bfloat16)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_planned_sizes_are_what_the_load_allocates(sources: dict[str, Path], setting: str) -> None:
    """The planner sees each tensor's real size (packed bytes + statistics), module by
    module, where transformers feeds accelerate half a byte per 4-bit element."""
    settings = SETTINGS[setting]
    spec = QuantSpec(
        bits=settings["bits"],
        quant_type=settings.get("quant_type", "nf4"),
        double_quant=settings.get("double_quant", False),
    )
    # as loaded on this CPU: in bitsandbytes' fused layout where it has AVX512-BF16
    sizes = placement.tensor_sizes(
        quantized_meta("llama", spec), spec, lambda m, a, t: torch.bfloat16, cpu_layout=packs()
    )
    got = load(sources["llama"], setting, device="cpu")
    assert sum(sizes.values()) == footprint(got).total_bytes
    for name in ("model.layers.0", "model.layers.1.mlp", "model.embed_tokens", "lm_head"):
        planned = sum(v for k, v in sizes.items() if k.startswith(name + "."))
        assert planned == footprint(got.get_submodule(name)).total_bytes, name


@pytest.mark.parametrize("gpus", [1, 2, 4])
@pytest.mark.parametrize("arch", ["llama", "llama-tied"])
def test_plans_across_simulated_gpus(arch: str, gpus: int) -> None:
    """Plans for GPUs of given sizes (planning needs no GPU): within every budget,
    decoder layers never split (``_no_split_modules``), tied weights together."""
    spec = QuantSpec(bits=4)
    model = quantized_meta(arch, spec)
    sizes = sizes_of(model, spec)
    layer = sum(v for k, v in sizes.items() if k.startswith("model.layers.0."))
    budget = {i: layer * 2 + layer // 2 for i in range(gpus)} | {"cpu": 10 * sum(sizes.values())}
    for strategy in ("auto", "sequential", "balanced_low_0"):
        plan = placement.plan(model, sizes, strategy, budget)
        used = placement.per_device(plan, sizes)
        assert set(used) <= set(budget), plan
        for device, nbytes in used.items():
            assert nbytes <= budget[device], (strategy, plan, used)
        for name in plan:  # a decoder layer is placed whole
            assert not name.startswith("model.layers.0."), plan
        assert sum(used.values()) == sum(sizes.values())
        if arch == "llama-tied":
            embed = placement.device_for(plan, "model.embed_tokens.weight")
            assert placement.device_for(plan, "lm_head.weight") == embed, plan


def test_a_plan_equals_accelerates_on_the_same_sizes() -> None:
    """The planner is accelerate's: fed a model whose tensors have the quantized sizes,
    ``infer_auto_device_map`` gives the same plan."""
    from accelerate.utils import infer_auto_device_map
    from torch import nn

    spec = QuantSpec(bits=4)
    model = quantized_meta("llama", spec)
    sizes = sizes_of(model, spec)
    budget = {0: "60KB", 1: "60KB", "cpu": "10MB"}
    plan = placement.plan(model, sizes, "sequential", budget)
    # the same tree, each tensor a uint8 meta tensor of its planned size, built by hand
    twin = build_empty_model(make_config("llama"))
    replace_linears(twin, spec, default_skip_modules(twin))
    for module_name, module in twin.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for attr in [a for a, p in module._parameters.items() if p is not None]:
            if prefix + attr not in sizes:  # tied: the first name's tensor
                continue
            empty = torch.empty(sizes[prefix + attr], dtype=torch.uint8, device="meta")
            module._parameters[attr] = nn.Parameter(empty, requires_grad=False)
        for attr in [a for a, b in module._buffers.items() if b is not None]:
            module._buffers[attr] = torch.empty(sizes[prefix + attr], dtype=torch.uint8)
    theirs = infer_auto_device_map(
        twin, max_memory=budget, no_split_module_classes=twin._no_split_modules
    )
    assert plan == dict(theirs)
    assert "cpu" in plan.values() and set(plan.values()) & {0, 1}  # split GPU / CPU


def test_a_plan_that_does_not_fit_is_refused_before_reading(
    sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_read(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the checkpoint was read")

    monkeypatch.setattr(leanstream._core.Checkpoint, "stream", no_read)
    with pytest.raises(ConfigError, match=r"does not fit.*disk.*cpu .* of 40KB"):
        load(sources["llama"], device_map="sequential", max_memory={"cpu": "40KB"})


def test_disk_and_unavailable_devices_are_refused(sources: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="disk"):
        load(sources["llama"], device_map={"model": "cpu", "lm_head": "disk"})
    with pytest.raises(ConfigError, match="disk"):
        load(sources["llama"], device_map="auto", max_memory={"cpu": "1GiB", "disk": "1TiB"})
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            load(sources["llama"], device_map={"model": 0, "lm_head": "cpu"})
    with pytest.raises(ConfigError, match=r"places no device for lm_head\.weight"):
        load(sources["llama"], device_map={"model": "cpu", "lm_head.bias": 0})
    with pytest.raises(ConfigError, match="pass one of them"):
        load(sources["llama"], device="cpu", device_map="auto")
    with pytest.raises(ConfigError, match="max_memory applies"):
        load(sources["llama"], device="cpu", max_memory={"cpu": "1GiB"})
    with pytest.raises(ConfigError, match="everywhere"):
        load(sources["llama"], device_map="everywhere")


def test_max_memory_on_a_missing_gpu_is_one_error(
    sources: dict[str, Path], caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    """Regression (issue 26): accelerate warned "Device 0 is not available" three times,
    then the error blamed a ``device=`` the caller never passed."""
    for max_memory in ({0: "22GiB"}, {"cuda:0": "22GiB", "cpu": "1GiB"}):
        with caplog.at_level("WARNING"), pytest.raises(ConfigError) as err:
            load(sources["llama"], device_map="auto", max_memory=max_memory)
        assert "max_memory" in str(err.value) and "cuda:0 is not available" in str(err.value)
        assert "device=" not in str(err.value)
    assert not [r for r in caplog.records if "not available" in r.getMessage()]
    assert "not available" not in "".join(capfd.readouterr())
    with pytest.raises(ConfigError) as err:
        load(sources["llama"], device_map="cuda")
    assert "device_map='cuda'" in str(err.value) and "device=" not in str(err.value)


def test_an_unknown_device_map_lists_the_strategies(sources: dict[str, Path]) -> None:
    """Regression (issue 26): ``device_map="bogus"`` listed torch's device types."""
    with pytest.raises(ConfigError) as err:
        load(sources["llama"], device_map="bogus")
    message = str(err.value)
    assert message.startswith("device_map='bogus'")
    for word in ("'auto'", "'balanced'", "'balanced_low_0'", "'sequential'", "dict", "'cpu'"):
        assert word in message
    assert "mkldnn" not in message
    with pytest.raises(ConfigError, match=r"device_map=\{'': 'bogus'\}: 'bogus' is not a device"):
        load(sources["llama"], device_map={"": "bogus"})


def test_prequantized_and_quantized_embeddings_follow_the_plan(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    model = load(sources["llama"], device="cpu", quantize_embeddings=True)
    saved = leanstream.save(model, tmp_path / "nf4", progress=False)
    got = leanstream.load(saved, device_map="auto", progress=False)
    assert assert_same_weights(model, got) > 0


def test_moe_experts_follow_the_plan(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "qwen3_moe", "qwen3_moe")
    ref = leanstream.load(folder, bits=4, device="cpu", progress=False)
    got = leanstream.load(folder, bits=4, device_map="auto", progress=False)
    ids = torch.tensor([[1, 5, 9, 42]])
    with torch.no_grad():
        assert torch.equal(ref(input_ids=ids).logits, got(input_ids=ids).logits)
    assert got.config.quantization_config.leanstream_quantized_experts


@pytest.fixture(scope="module")
def folders(sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny llama, and a tiny MoE whose experts load as :class:`QuantizedExperts`."""
    return {**sources, "qwen3_moe": write_model(tmp_path_factory.mktemp("moe"), "qwen3_moe")}


def where_of(plan: dict[str, Any]) -> placement.Where:
    """The plan's :class:`Where`, with the main device :class:`Placing` gives it."""
    return placement.Where(placement.as_device(placement._main_entry(plan)), plan)


def assert_runs_as_planned(model: Any, where: placement.Where) -> None:
    """After the dispatch: the root's hook sends the inputs to the main device (and the
    outputs back), every module that holds tensors has a hook whose execution device is
    where they are planned, no hook runs a module elsewhere, every tensor is where
    planned."""
    assert model._hf_hook.execution_device == where.main and model._hf_hook.io_same_device
    for name, module in model.named_modules():
        own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        hook = getattr(module, "_hf_hook", None)
        if not name or (hook is None and not own):  # the root; a module split between blocks
            continue
        assert hook is not None, name
        entry = placement.device_for(where.device_map, f"{name}.{own[0][0]}" if own else name)
        assert torch.device(hook.execution_device) == where.by_entry.get(entry), (name, hook)
    assert not placement.misplaced(model, where)


def on_meta(model: Any, where: placement.Where) -> None:
    """Every tensor planned on ``meta`` (the stand-in for a GPU) moved there, as the load
    leaves a split model: each tensor on its planned device before the dispatch."""
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for table, wrap in ((module._parameters, True), (module._buffers, False)):
            for attr, tensor in list(table.items()):
                if tensor is not None and where(prefix + attr).type == "meta":
                    empty = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
                    table[attr] = torch.nn.Parameter(empty, requires_grad=False) if wrap else empty


SPLITS = {
    # accelerate's plans: the first modules on the GPU, the rest on the CPU
    "gpu-then-cpu": {
        "model.embed_tokens": "meta",
        "model.rotary_emb": "meta",
        "model.layers.0": "meta",
        "model.layers.1": "cpu",
        "model.norm": "cpu",
        "lm_head": "cpu",
    },
    # a dict written by hand: entries inside another's module
    "nested": {"": "meta", "model.layers.1": "cpu", "lm_head": "cpu"},
    "cpu-inside-gpu-inside-cpu": {"": "cpu", "model.layers": "meta", "model.layers.1.mlp": "cpu"},
}


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("setting", ["nf4", "int8"])
@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_a_split_runs_each_module_where_planned_and_moves_no_tensor(
    folders: dict[str, Path], arch: str, setting: str, split: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (issue 25): the dispatch of a GPU + CPU plan gave the root a hook that
    placed the whole model on the GPU (out of memory where a split was needed;
    ``TypeError: __new__() got an unexpected keyword argument 'requires_grad'`` for CPU
    experts) and every module a hook running it on the GPU. On the CPU, ``meta`` stands
    in for the GPU: each module's hook runs it where planned, and no tensor is moved or
    rebuilt (the weights are in place after the load; the hooks move activations)."""
    import accelerate.hooks

    plan = SPLITS[split]
    with monkeypatch.context() as patched:
        patched.setattr(placement, "as_device", torch.device)  # which refuses "meta"
        where = where_of(plan)
    model = load(folders[arch], setting, device="cpu")
    on_meta(model, where)
    if arch == "qwen3_moe":  # the experts of a CPU layer are the quantized parameter
        experts = model.model.layers[1].mlp.experts.gate_up_proj
        assert isinstance(experts, QuantizedExperts) and where("model.layers.1.mlp").type == "cpu"
    before = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()]}
    moves: list[tuple[str, torch.device, Any]] = []
    set_device = accelerate.hooks.set_module_tensor_to_device

    def spy(module: Any, name: str, device: Any, *args: Any, **kwargs: Any) -> None:
        owner, _, attr = name.rpartition(".")
        holder = module.get_submodule(owner)
        tensor = holder._parameters.get(attr, holder._buffers.get(attr))
        if tensor.device != torch.device(device):
            moves.append((name, tensor.device, device))
        set_device(module, name, device, *args, **kwargs)

    monkeypatch.setattr(accelerate.hooks, "set_module_tensor_to_device", spy)
    where.dispatch(model)
    assert moves == []
    after = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()]}
    assert [n for n in before if after[n] is not before[n]] == []
    assert model.hf_device_map == plan
    assert_runs_as_planned(model, where)


@pytest.mark.parametrize(
    "plan",
    [
        {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu", "": "cpu"},
        {"": "cpu", "model.layers.1": "cpu", "lm_head": "cpu"},
    ],
    ids=["blocks", "nested"],
)
@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_hooks_across_devices_run_forward_and_generate(
    folders: dict[str, Path], arch: str, plan: dict[str, Any]
) -> None:
    """The dispatch a plan over several devices gets (accelerate's hooks, each block run
    on its device, CPU blocks quantized on the CPU), exercised here with every block on
    the CPU: outputs equal to the undispatched model's."""
    ref = load(folders[arch], device="cpu")
    got = load(folders[arch], device="cpu")
    where = where_of(plan)
    where.several = True  # as on a GPU + CPU plan
    where.dispatch(got)
    assert got.hf_device_map == plan
    assert hasattr(got.model.layers[1], "_hf_hook")  # accelerate's hooks are attached
    assert_runs_as_planned(got, where)
    ids = torch.tensor([[1, 5, 9, 42, 7, 100, 11, 2]])  # within the MoE's vocabulary
    with torch.no_grad():
        assert torch.equal(ref(input_ids=ids).logits, got(input_ids=ids).logits)
    ids = ids[:, :4]
    assert torch.equal(
        got.generate(input_ids=ids, max_new_tokens=4, do_sample=False),
        ref.generate(input_ids=ids, max_new_tokens=4, do_sample=False),
    )


@pytest.mark.gpu
@pytest.mark.parametrize("setting", ["nf4", "int8"])
def test_a_gpu_cpu_split_runs_as_the_gpu_model(sources: dict[str, Path], setting: str) -> None:
    """Half the layers on the CPU (quantized), half on the GPU: logits as the one-GPU
    model's (CPU and GPU kernels round differently), each device within its plan."""
    spec = QuantSpec(bits=SETTINGS[setting]["bits"])
    sizes = sizes_of(quantized_meta("llama", spec), spec)
    gpu_share = sum(v for k, v in sizes.items() if not k.startswith("model.layers.1"))
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    got = load(
        sources["llama"],
        setting,
        device_map="sequential",
        max_memory={0: gpu_share + 4096, "cpu": "1GiB"},
    )
    assert set(got.hf_device_map.values()) == {0, "cpu"}, got.hf_device_map
    planned_gpu = placement.per_device(got.hf_device_map, sizes)[0]
    largest = max(sizes.values()) * 4  # a full-precision tensor in flight (fp32 at most)
    assert torch.cuda.max_memory_allocated() - base <= planned_gpu + largest
    where = where_of(got.hf_device_map)
    assert_runs_as_planned(got, where)  # each module runs where planned, nothing copied
    one = load(sources["llama"], setting, device="cuda")
    ids = torch.tensor([[1, 5, 9, 42, 7, 300, 11, 2]], device="cuda")
    with torch.no_grad():
        a = one(input_ids=ids).logits.float().cpu()
        b = got(input_ids=ids).logits.float().cpu()
        c = got(input_ids=ids.cpu()).logits  # outputs return to the inputs' device
    assert (a - b).norm() / a.norm() < 2e-2 and c.device.type == "cpu"
    out = got.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4) and out.device == ids.device
    assert_runs_as_planned(got, where)  # the forwards moved no weight


def test_a_load_across_devices_streams_one_run_per_device() -> None:
    """Consecutive tensors on one device form one run (its own pipeline on a GPU), in
    the plan's order, every tensor in exactly one run."""
    from leanstream.matching import Target
    from leanstream.placement import runs

    names = ["embed.weight", "layers.0.w", "layers.0.b", "layers.1.w", "norm.weight", "head.w"]
    plan = {"embed": 0, "layers.0": 0, "layers.1": "cpu", "norm": 1, "head": 1}

    def where(name: str) -> torch.device:
        return placement.torch_device(placement.device_for(plan, name))

    targets = [
        Target(key=n, name=n, module=None, attr="w", dtype=None, transpose=False, buffer=False)  # type: ignore[arg-type]
        for n in names
    ]
    runs = [(str(device), [t.name for t in run]) for device, run in runs(targets, where)]  # type: ignore[arg-type]
    assert runs == [
        ("cuda:0", ["embed.weight", "layers.0.w", "layers.0.b"]),
        ("cpu", ["layers.1.w"]),
        ("cuda:1", ["norm.weight", "head.w"]),
    ]
