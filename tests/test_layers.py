"""Which layers a load quantizes, where leanstream's rules go beyond the library's
(``leanstream.layers``): ``nn.Linear`` subclasses with a forward of their own stay as
they are (transformers' rule), a subclass that is a plain linear is quantized, a layer
whose weight a forward reads directly stays in full precision, an experts module whose
forward uses its whole 3-D weight keeps it; and options that would do nothing are
refused. ``inspect`` says each of these, from the plan ``load`` follows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import pytest
import torch
import transformers
from safetensors.torch import save_file
from test_load import SETTINGS, logits, ours, reference
from torch import nn

import leanstream
from leanstream import ConfigError
from leanstream.cli import inspect_checkpoint
from models import _DECODER

# the outcome depends on bitsandbytes' CPU 4-bit kernel (tests/cpu_kernel.py)
pytestmark = pytest.mark.cpu_kernel

CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "phimoe": ("PhimoeConfig", {**_DECODER, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "llama4_text": (
        "Llama4TextConfig",
        {
            **_DECODER,
            "intermediate_size_mlp": 192,
            "head_dim": 16,
            "num_local_experts": 4,
            "num_experts_per_tok": 1,
            "layer_types": ["full_attention", "full_attention"],
            "no_rope_layers": [1, 1],
        },
    ),
    "mamba": (
        "MambaConfig",
        dict(hidden_size=64, state_size=16, num_hidden_layers=2, vocab_size=320, time_step_rank=8),
    ),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layers")
    found = {}
    for name, (config_class, kwargs) in CONFIGS.items():
        config = getattr(transformers, config_class)(**kwargs)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
        model.save_pretrained(root / name)
        found[name] = root / name
    return found


def loaded(folder: Path, setting: str) -> Any:
    """leanstream's load; of Llama 4, with the warning that its experts stay bf16."""
    if folder.name != "llama4_text":
        return ours(folder, SETTINGS[setting])
    with pytest.warns(UserWarning, match=r"4 experts weights .* stay in full precision") as seen:
        model = ours(folder, SETTINGS[setting])
    assert "Llama4TextExperts.forward uses the whole 3-D" in str(seen[0].message)
    return model


def bits_of(setting: str) -> int:
    return int(SETTINGS[setting]["bits"])


def quantized_names(model: nn.Module) -> set[str]:
    layers = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return {name for name, m in model.named_modules() if isinstance(m, layers)}


# --- nn.Linear subclasses --------------------------------------------------------------


@pytest.mark.parametrize("setting", ["nf4", "int8"])
@pytest.mark.parametrize(
    ("arch", "router"), [("phimoe", "PhimoeTopKRouter"), ("llama4_text", "Llama4Router")]
)
def test_routers_with_a_forward_of_their_own_stay_as_transformers_keeps_them(
    folders: dict[str, Path], arch: str, router: str, setting: str
) -> None:
    got = loaded(folders[arch], setting)
    ref = reference(folders[arch], SETTINGS[setting])
    routers = [n for n, m in got.named_modules() if type(m).__name__ == router]
    assert routers and all(type(ref.get_submodule(n)).__name__ == router for n in routers)
    assert all(got.get_submodule(n).weight.dtype == torch.bfloat16 for n in routers)
    assert quantized_names(got) >= quantized_names(ref)  # and every layer transformers quantizes
    assert torch.isfinite(logits(got)).all()  # it runs: "too many values to unpack" before
    report = inspect_checkpoint(folders[arch])
    assert set(routers) <= set(report["kept_in_full_precision"])
    assert all(report["notes"][n] == f"kept: {router} has a forward of its own" for n in routers)


@pytest.mark.parametrize("setting", ["nf4", "int8"])
def test_experts_whose_forward_uses_the_whole_weight_stay_as_transformers_keeps_them(
    folders: dict[str, Path], setting: str
) -> None:
    """Llama 4's experts ``bmm`` the whole 3-D weight: not quantized, the model is
    transformers' own, bit for bit."""
    got = loaded(folders["llama4_text"], setting)
    ref = reference(folders["llama4_text"], SETTINGS[setting])
    assert not hasattr(got.config.quantization_config, "leanstream_quantized_experts")
    experts = got.model.layers[0].feed_forward.experts
    assert type(experts.gate_up_proj) is nn.Parameter
    assert experts.gate_up_proj.dtype == torch.bfloat16
    assert quantized_names(got) == quantized_names(ref)
    assert torch.equal(logits(got), logits(ref))
    notes = inspect_checkpoint(folders["llama4_text"])["notes"]
    assert notes["model.layers.0.feed_forward.experts.gate_up_proj"] == (
        "kept: Llama4TextExperts.forward uses the whole 3-D gate_up_proj, not one expert at a time"
    )


class PlainSubclass(nn.Linear):
    """A subclass that adds nothing: it computes nn.Linear's forward."""


class OwnForward(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(super().forward(x), dim=-1)


class ReadsWeight(nn.Module):
    """A block whose forward multiplies by its child's weight, as Mamba's slow path
    multiplies by ``dt_proj.weight``."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(64, 128)
        self.gate = nn.Linear(128, 64, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        return h @ self.gate.weight.T


class Subclasses(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.plain = PlainSubclass(64, 128)
        self.own = OwnForward(128, 64)
        self.block = ReadsWeight()
        self.out = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.out.weight.device)  # only where it is: out is quantized all the same
        return self.out(self.block(self.own(self.plain(x))))


@pytest.fixture
def subclasses_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    state = {
        name: (torch.randn(p.shape, generator=gen) * 0.05).to(torch.bfloat16)
        for name, p in Subclasses().named_parameters()
    }
    path = tmp_path / "subclasses.safetensors"
    save_file(state, path)
    return path, state


@pytest.mark.parametrize("setting", ["nf4", "int8"])
def test_a_plain_subclass_is_quantized_and_the_rest_stays(
    subclasses_file: tuple[Path, dict[str, torch.Tensor]], setting: str
) -> None:
    path, state = subclasses_file
    got = leanstream.load_into(
        Subclasses, path, bits=bits_of(setting), device="cpu", progress=False
    )
    assert quantized_names(got) == {"plain", "block.proj", "out"}
    for kept in ("own", "block.gate"):
        module = got.get_submodule(kept)
        assert not isinstance(module, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt), kept
        assert torch.equal(module.weight, state[f"{kept}.weight"])  # untouched
    assert type(got.own) is OwnForward
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        out = got(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_a_bare_plain_subclass_is_quantized(
    subclasses_file: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    path = tmp_path / "one.safetensors"
    save_file({"weight": torch.randn(128, 64, dtype=torch.bfloat16)}, path)
    got = leanstream.load_into(
        lambda: PlainSubclass(64, 128, bias=False), path, bits=4, device="cpu", progress=False
    )
    assert isinstance(got, bnb.nn.Linear4bit)


# --- weights read directly ---------------------------------------------------------------


@pytest.mark.parametrize("setting", ["nf4", "int8"])
def test_mamba_keeps_the_layers_its_forward_reads_and_runs(
    folders: dict[str, Path], setting: str
) -> None:
    """Mamba's mixer multiplies by ``dt_proj.weight`` (and hands ``x_proj``' and
    ``out_proj``'s weights to its fused kernel); its causal LM casts to
    ``lm_head.weight.dtype``. transformers quantizes them and crashes at the first
    forward; leanstream keeps them, and the model is close to the bf16 one."""
    folder = folders["mamba"]
    got = ours(folder, SETTINGS[setting])
    mixers = [n for n, m in got.named_modules() if type(m).__name__ == "MambaMixer"]
    for mixer in mixers:
        assert f"{mixer}.in_proj" in quantized_names(got)
        for kept in ("dt_proj", "x_proj", "out_proj"):
            assert type(got.get_submodule(f"{mixer}.{kept}")) is nn.Linear
    skip = got.config.quantization_config.llm_int8_skip_modules
    assert f"{mixers[0]}.dt_proj" in skip  # recorded: transformers reloads it the same
    full = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    a, b = logits(full), logits(got)
    assert ((a - b).norm() / a.norm()).item() < (0.25 if setting != "int8" else 0.05)
    report = inspect_checkpoint(folder)
    assert report["notes"][f"{mixers[0]}.dt_proj"] == (
        "kept: MambaMixer.forward reads self.dt_proj.weight"
    )
    assert sorted(report["kept_in_full_precision"]) == sorted(
        n for n, m in got.named_modules() if type(m) is nn.Linear
    )


@pytest.mark.parametrize("flag", ["quantize_lm_head", "quantize_embeddings"])
def test_an_output_embedding_read_directly_is_never_quantized(
    folders: dict[str, Path], flag: str
) -> None:
    """``hidden_states.to(self.lm_head.weight.dtype)`` on a packed weight would cast the
    activations to uint8: the tied pair stays as it is."""
    got = leanstream.load(folders["mamba"], bits=4, device="cpu", progress=False, **{flag: True})
    assert type(got.lm_head) is nn.Linear and type(got.get_input_embeddings()) is nn.Embedding
    assert got.lm_head.weight.dtype == torch.bfloat16


# --- options that would do nothing ---------------------------------------------------------


def test_skip_modules_naming_no_layer_to_quantize_is_refused(sources: dict[str, Path]) -> None:
    """A pattern matching only a norm, or a module holding linears by its own name (transformers'
    matching reads "mlp" as a prefix or a suffix of a layer's name: it keeps nothing),
    would do nothing: refused."""
    for pattern in ("model.norm", "mlp"):
        with pytest.raises(ConfigError, match=rf"skip_modules \['{pattern}'\] match no layer"):
            leanstream.load(sources["llama"], skip_modules=[pattern], device="cpu", progress=False)
    # lm_head, kept anyway, is a layer: transformers' usual list is accepted
    got = leanstream.load(
        sources["llama"],
        skip_modules=["lm_head", "mlp.down_proj", "model.layers.1"],
        device="cpu",
        progress=False,
    )
    kept = {n for n, m in got.named_modules() if type(m) is nn.Linear}
    assert kept == {"lm_head", "model.layers.0.mlp.down_proj"} | {
        n
        for n, m in got.named_modules()
        if n.startswith("model.layers.1.") and type(m) is nn.Linear
    }
    assert len(kept) > 3


def test_ignore_unexpected_matching_no_extra_tensor_is_refused(
    subclasses_file: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    _, state = subclasses_file
    state = {**state, "vision.proj.weight": torch.zeros(4, 4, dtype=torch.bfloat16)}
    path = tmp_path / "more.safetensors"
    save_file(state, path)
    with pytest.raises(ConfigError, match=r"ignore_unexpected \['\^vison'\] match no extra"):
        leanstream.load_into(
            Subclasses, path, ignore_unexpected=["^vison"], device="cpu", progress=False
        )
    leanstream.load_into(
        Subclasses, path, ignore_unexpected=["^vision"], device="cpu", progress=False
    )


def test_experts_held_as_2d_tensors_are_named_where_they_stay_bf16(tmp_path: Path) -> None:
    """DBRX holds its experts as one 2-D ``w1``/``v1``/``w2`` ``[E * I, H]`` each: neither
    linears nor 3-D experts weights, they stay in full precision (as in transformers), and
    load and inspect say so (issue 27, item 3)."""
    config = transformers.DbrxConfig(
        d_model=64,
        n_heads=4,
        n_layers=2,
        max_seq_len=128,
        vocab_size=320,
        # transformers 5.23's defaults cannot build it: no rope_theta, clip_qkv None
        attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
        ffn_config={"ffn_hidden_size": 128, "moe_num_experts": 4, "moe_top_k": 2},
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(
        tmp_path / "dbrx"
    )
    with pytest.warns(UserWarning, match=r"6 experts weights of DbrxForCausalLM stay") as seen:
        got = ours(tmp_path / "dbrx", SETTINGS["nf4"])
    assert "DbrxExpertGLU holds the 4 experts as one 2-D" in str(seen[0].message)
    w1 = got.get_parameter("transformer.blocks.0.ffn.experts.mlp.w1")
    assert w1.dtype == torch.bfloat16 and tuple(w1.shape) == (512, 64)
    assert "transformer.blocks.0.norm_attn_norm.attn.Wqkv" in quantized_names(got)
    assert torch.isfinite(logits(got)).all()
    notes = inspect_checkpoint(tmp_path / "dbrx")["notes"]
    assert notes["transformer.blocks.1.ffn.experts.mlp.v1"] == (
        "kept: DbrxExpertGLU holds the 4 experts as one 2-D v1 [512, 64], neither linears "
        "nor 3-D experts weights"
    )
