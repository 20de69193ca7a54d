"""``leanstream.load_into``: any ``nn.Module`` built on meta (or by a factory), with
``key_map``, ``init_missing`` and ``ignore_unexpected``, against bitsandbytes' own
quantization of the same weights (the InvokeAI pattern: swap the linears, quantize
each weight with ``Params4bit`` / ``Int8Params``)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import save_file
from test_load import SETTINGS, assert_same_weights
from torch import nn

import leanstream
from leanstream import ConfigError, MismatchError

# the outcome depends on bitsandbytes' CPU 4-bit kernel (tests/cpu_kernel.py)
pytestmark = pytest.mark.cpu_kernel


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


class Net(nn.Module):
    """A plain module: embedding, blocks, a head tied to the embedding, a computed buffer."""

    def __init__(self, dim: int = 64, vocab: int = 96, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.register_buffer("scale", torch.linspace(0.5, 1.5, dim), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = (self.embed(ids) * self.scale).to(self.embed.weight.dtype)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def random_state(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Seeded random weights for every parameter (tied ones once), in ``dtype``."""
    gen = torch.Generator().manual_seed(1)
    state = {}
    for name, param in model.named_parameters():  # remove_duplicate: tied stored once
        state[name] = (torch.randn(param.shape, generator=gen) * 0.05).to(dtype)
    return state


@pytest.fixture
def net_file(tmp_path: Path) -> Path:
    path = tmp_path / "net.safetensors"
    save_file(random_state(Net()), path)
    return path


def bnb_reference(state: dict[str, torch.Tensor], settings: dict[str, Any]) -> Net:
    """``Net`` with every untied linear swapped for bitsandbytes' and quantized by
    bitsandbytes itself, the way InvokeAI/ComfyUI do by hand."""
    model = Net()
    model.load_state_dict(state, strict=False)
    for param in model.parameters():  # the computed buffer keeps its float32, as in ours
        param.data = param.data.to(torch.bfloat16)
    for block in model.blocks:
        for attr in ("fc1", "fc2"):
            linear = getattr(block, attr)
            has_bias = linear.bias is not None
            weight = linear.weight.data
            if settings["bits"] == 4:
                new = bnb.nn.Linear4bit(
                    linear.in_features,
                    linear.out_features,
                    has_bias,
                    compute_dtype=torch.bfloat16,
                    compress_statistics=settings["double_quant"],
                    quant_type=settings["quant_type"],
                )
                new.weight = bnb.nn.Params4bit(
                    weight,
                    requires_grad=False,
                    quant_type=settings["quant_type"],
                    compress_statistics=settings["double_quant"],
                )
            else:
                new = bnb.nn.Linear8bitLt(
                    linear.in_features, linear.out_features, has_bias, has_fp16_weights=False
                )
                new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            if has_bias:
                new.bias = nn.Parameter(linear.bias.data, requires_grad=False)
            new.to("cpu")  # bitsandbytes quantizes here
            setattr(block, attr, new)
    return model.eval()


def ids() -> torch.Tensor:
    return torch.tensor([[1, 5, 9, 42, 7, 90, 11, 2]])


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_plain_module_bit_identical_to_bitsandbytes(net_file: Path, setting: str) -> None:
    from safetensors.torch import load_file

    settings = SETTINGS[setting]
    extra = {"compute_dtype": torch.bfloat16} if settings["bits"] == 4 else {}
    got = leanstream.load_into(Net, net_file, device="cpu", progress=False, **settings, **extra)
    ref = bnb_reference(load_file(net_file), settings)
    assert assert_same_weights(ref, got) == 4
    # the tied head shares the embedding's (unquantized) weight, as in the model built
    assert type(got.head) is nn.Linear and got.head.weight is got.embed.weight
    assert got.embed.weight.dtype == torch.bfloat16 and not got.embed.weight.is_meta
    assert torch.equal(got.scale, torch.linspace(0.5, 1.5, 64))  # computed, not loaded
    with torch.no_grad():
        assert torch.equal(got(ids()), ref(ids()))
    config = got.quantization_config  # the settings are recorded on the model
    assert config.load_in_4bit == (settings["bits"] == 4)
    assert config.load_in_8bit == (settings["bits"] == 8)
    if settings["bits"] == 4:
        assert config.bnb_4bit_quant_type == settings["quant_type"]
        assert config.bnb_4bit_use_double_quant == settings["double_quant"]
    assert not got.training


def test_a_model_built_on_meta_by_the_caller(net_file: Path) -> None:
    with leanstream.empty_parameters():
        model = Net()
    assert model.blocks[0].fc1.weight.is_meta
    assert not model.scale.is_meta  # buffers computed in __init__ stay real
    assert model.head.weight is model.embed.weight  # the tie made in __init__ holds
    got = leanstream.load_into(model, net_file, bits=4, device="cpu", progress=False)
    assert got is model
    assert isinstance(model.blocks[0].fc1, bnb.nn.Linear4bit)
    assert not any(p.is_meta for p in model.parameters())


def test_a_model_built_by_accelerate_init_empty_weights(tmp_path: Path) -> None:
    from accelerate import init_empty_weights

    path = tmp_path / "block.safetensors"
    save_file(random_state(Block(64)), path)
    with init_empty_weights():
        model = Block(64)
    leanstream.load_into(model, path, bits=8, device="cpu", progress=False)
    assert isinstance(model.fc2, bnb.nn.Linear8bitLt)
    assert not any(p.is_meta for p in model.parameters())


def test_a_tie_lost_in_the_meta_build_is_a_mismatch(net_file: Path) -> None:
    """accelerate's init_empty_weights re-creates each parameter as it is registered, so
    ``head.weight = embed.weight`` makes two meta tensors: the head's is then missing
    from the checkpoint (stored once), refused rather than left random.
    ``empty_parameters`` keeps the tie (the test above)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = Net()
    assert model.head.weight is not model.embed.weight
    with pytest.raises(MismatchError) as err:
        leanstream.load_into(model, net_file, bits=4, device="cpu", progress=False)
    assert err.value.missing == ["head.weight"]


def test_unquantized_load_equals_load_state_dict(net_file: Path) -> None:
    from safetensors.torch import load_file

    got = leanstream.load_into(Net, net_file, bits=None, device="cpu", progress=False)
    ref = Net()
    ref.load_state_dict(load_file(net_file), strict=False)
    for param in ref.parameters():
        param.data = param.data.to(torch.bfloat16)
    ref.eval()
    for (name, a), (_, b) in zip(ref.state_dict().items(), got.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert not hasattr(got, "quantization_config")


class Wrapped(nn.Module):
    """``Net`` under another name, as research code stores it (``model.diffusion_model.``)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = Net()


@pytest.mark.parametrize("form", ["dict", "regex", "function"])
def test_key_map(tmp_path: Path, form: str) -> None:
    state = random_state(Net())
    path = tmp_path / "prefixed.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in state.items()}, path)
    key_map: Any = {
        "dict": {f"model.diffusion_model.{k}": f"inner.{k}" for k in state},
        "regex": [(r"^model\.diffusion_model\.", "inner.")],
        "function": lambda key: "inner." + key.removeprefix("model.diffusion_model."),
    }[form]
    got = leanstream.load_into(Wrapped, path, key_map=key_map, bits=4, device="cpu", progress=False)
    ref = bnb_reference(state, SETTINGS["nf4"])
    assert assert_same_weights(ref, got.inner) == 4


def test_without_key_map_the_names_are_a_mismatch(tmp_path: Path) -> None:
    state = random_state(Net())
    path = tmp_path / "prefixed.safetensors"
    save_file({f"model.{k}": v for k, v in state.items()}, path)
    with pytest.raises(MismatchError) as err:
        leanstream.load_into(Net, path, bits=4, device="cpu", progress=False)
    assert "model.blocks.0.fc1.weight" in str(err.value)  # unexpected
    assert "blocks.0.fc1.weight" in err.value.missing


def test_key_map_that_merges_two_tensors_is_refused(net_file: Path) -> None:
    with pytest.raises(MismatchError):
        leanstream.load_into(
            Net,
            net_file,
            key_map=[(r"fc2", "fc1")],
            bits=4,
            device="cpu",
            progress=False,
        )


class LoRA(nn.Module):
    """A LoRA-like adapter: ``down`` random, ``up`` zero, set by its own reset_parameters."""

    def __init__(self, dim: int, rank: int = 4) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.down.weight, a=5**0.5)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class NetWithAdapters(Net):
    def __init__(self) -> None:
        super().__init__()
        self.adapters = nn.ModuleList(LoRA(64) for _ in self.blocks)
        self.new_head = nn.Linear(64, 8)  # not in the checkpoint either

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = (self.embed(ids) * self.scale).to(self.embed.weight.dtype)
        for block, adapter in zip(self.blocks, self.adapters, strict=True):
            x = block(x) + adapter(x)
        return self.head(x)


def test_missing_tensors_are_a_mismatch_unless_init_missing(net_file: Path) -> None:
    with pytest.raises(MismatchError) as err:
        leanstream.load_into(NetWithAdapters, net_file, bits=4, device="cpu", progress=False)
    assert "adapters.0.up.weight" in err.value.missing
    assert "new_head.weight" in err.value.missing
    with pytest.raises(MismatchError) as err:
        leanstream.load_into(
            NetWithAdapters,
            net_file,
            init_missing=[r"^adapters\."],
            bits=4,
            device="cpu",
            progress=False,
        )
    assert sorted(err.value.missing) == ["new_head.bias", "new_head.weight"]


def test_init_missing_runs_the_modules_own_initialization(net_file: Path) -> None:
    torch.manual_seed(0)
    got = leanstream.load_into(
        NetWithAdapters,
        net_file,
        init_missing=[r"^adapters\.", r"^new_head\."],
        skip_modules=["adapters"],
        bits=4,
        device="cpu",
        progress=False,
    )
    base = leanstream.load_into(Net, net_file, bits=4, device="cpu", progress=False)
    for adapter in got.adapters:
        assert type(adapter.up) is nn.Linear  # skip_modules kept them full precision
        # LoRA.reset_parameters ran (not nn.Linear's own, which would not give zeros)
        assert torch.count_nonzero(adapter.up.weight) == 0
        down = adapter.down.weight.float()
        bound = 1 / 64**0.5  # kaiming_uniform_(a=sqrt(5)) on fan_in 64
        assert down.abs().max() <= bound and down.std() > bound / 3
        assert adapter.down.weight.dtype == torch.bfloat16
    # nn.Linear.reset_parameters made the new head, then it was quantized like a loaded one
    assert isinstance(got.new_head, bnb.nn.Linear4bit) and got.new_head.weight.bnb_quantized
    assert got.new_head.bias.abs().max() <= 1 / 64**0.5 and got.new_head.bias.std() > 0
    with torch.no_grad():  # up = 0: the adapters add nothing yet
        assert torch.equal(got(ids()), base(ids()))


def test_init_missing_without_reset_parameters_is_refused(tmp_path: Path) -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(8, 8)
            self.gain = nn.Parameter(torch.ones(8))

    path = tmp_path / "x.safetensors"
    save_file({"linear.weight": torch.zeros(8, 8), "linear.bias": torch.zeros(8)}, path)
    with pytest.raises(ConfigError, match=r"gain.*reset_parameters"):
        leanstream.load_into(
            Scaled, path, init_missing=["gain"], bits=4, device="cpu", progress=False
        )


def test_init_missing_in_a_transformers_model_uses_init_weights(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    from models import edit_tensor, make_config

    folder = tmp_path / "llama"
    import shutil

    shutil.copytree(sources["llama"], folder)
    edit_tensor(folder, "lm_head.weight", None)
    config = make_config("llama")
    got = leanstream.load_into(
        lambda: AutoModelForCausalLM.from_config(config),
        folder,
        init_missing=["lm_head"],
        bits=4,
        device="cpu",
        progress=False,
    )
    weight = got.lm_head.weight  # kept full precision (transformers' rule), initialized
    assert type(got.lm_head) is nn.Linear and not weight.is_meta
    std = config.initializer_range
    assert abs(weight.float().std().item() - std) < std / 4
    assert got.is_loaded_in_4bit and got.config.quantization_config.load_in_4bit


def test_ignore_unexpected(net_file: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(net_file)
    state["vision.proj.weight"] = torch.zeros(4, 4, dtype=torch.bfloat16)
    path = tmp_path / "more.safetensors"
    save_file(state, path)
    with pytest.raises(MismatchError) as err:
        leanstream.load_into(Net, path, bits=4, device="cpu", progress=False)
    assert err.value.unexpected == ["vision.proj.weight"]
    got = leanstream.load_into(
        Net, path, ignore_unexpected=[r"^vision\."], bits=4, device="cpu", progress=False
    )
    assert assert_same_weights(bnb_reference(state, SETTINGS["nf4"]), got) == 4


def test_two_loads_in_two_threads(net_file: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.safetensors"
    save_file({k: v * 2 for k, v in random_state(Net()).items()}, other)
    results: dict[str, Any] = {}

    def run(name: str, path: Path) -> None:
        try:
            results[name] = leanstream.load_into(Net, path, bits=4, device="cpu", progress=False)
        except BaseException as err:  # reported below
            results[name] = err

    threads = [
        threading.Thread(target=run, args=(str(i), path))
        for i, path in enumerate([net_file, other, net_file, other])
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    single = leanstream.load_into(Net, net_file, bits=4, device="cpu", progress=False)
    for name, got in results.items():
        assert isinstance(got, Net), got
        if name in ("0", "2"):
            assert assert_same_weights(single, got) == 4
    # a module built outside any load in this thread is a normal one
    assert not nn.Linear(2, 2).weight.is_meta


def test_bad_arguments_are_named(net_file: Path) -> None:
    with pytest.raises(ConfigError, match=r"not an nn\.Module"):
        leanstream.load_into(lambda: 42, net_file, bits=4, device="cpu", progress=False)
    with pytest.raises(ConfigError, match=r"nn\.Module or a zero-argument callable"):
        leanstream.load_into(42, net_file, bits=4, device="cpu", progress=False)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="key_map gave"):
        leanstream.load_into(
            Net, net_file, key_map=lambda k: None, bits=4, device="cpu", progress=False
        )  # type: ignore[arg-type, return-value]


def bnb_linear(weight: torch.Tensor, bias: torch.Tensor, bits: int) -> nn.Module:
    """bitsandbytes' own layer for ``weight`` / ``bias``, quantized by bitsandbytes."""
    out_features, in_features = weight.shape
    if bits == 4:
        layer: nn.Module = bnb.nn.Linear4bit(
            in_features,
            out_features,
            True,
            compute_dtype=torch.bfloat16,
            compress_statistics=False,
            quant_type="nf4",
        )
        layer.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, quant_type="nf4", compress_statistics=False
        )
    else:
        layer = bnb.nn.Linear8bitLt(in_features, out_features, True, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer.to("cpu").eval()  # bitsandbytes quantizes here


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("form", ["factory", "module"])
def test_a_bare_layer_is_returned_quantized(tmp_path: Path, bits: int, form: str) -> None:
    """Regression (issue 26, item 8): the model IS the Linear; it cannot replace itself
    ("Cannot set the submodule without a target name!"), so the bitsandbytes layer that
    replaces it is returned."""
    path = tmp_path / "linear.safetensors"
    gen = torch.Generator().manual_seed(2)
    weight = (torch.randn(256, 128, generator=gen) * 0.05).to(torch.bfloat16)
    bias = (torch.randn(256, generator=gen) * 0.05).to(torch.bfloat16)
    save_file({"weight": weight, "bias": bias}, path)
    if form == "factory":
        model: Any = lambda: nn.Linear(128, 256)  # noqa: E731
    else:
        with leanstream.empty_parameters():
            model = nn.Linear(128, 256)
    extra = {"compute_dtype": torch.bfloat16} if bits == 4 else {}
    got = leanstream.load_into(model, path, bits=bits, device="cpu", progress=False, **extra)
    ref = bnb_linear(weight, bias, bits)
    assert type(got) is type(ref) and not got.training
    assert assert_same_weights(ref, got) == 1
    x = torch.randn(3, 128, generator=gen).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(got(x), ref(x))
    assert got.quantization_config.load_in_4bit == (bits == 4)
    if form == "module":
        assert got is not model and model.weight.is_meta  # the one given is left as it was
