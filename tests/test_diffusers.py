"""diffusers components (FLUX and SD3 transformers, a UNet) loaded by ``leanstream.load``,
against diffusers' own bitsandbytes quantization of the same weights on the CPU.

diffusers refuses to quantize without a GPU (``validate_environment``); the reference
runs under :func:`diffusers_models.cpu_bitsandbytes`, which patches that check (and
only it) because bitsandbytes >= 0.49 quantizes on the CPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import pytest
import torch
from cpu_kernel import contiguous_inputs, exact_round_trip, plain_kernel
from test_load import SETTINGS, assert_same_weights
from torch import nn

import leanstream
from leanstream import ConfigError

# the outcome depends on bitsandbytes' CPU 4-bit kernel (tests/cpu_kernel.py)
pytestmark = pytest.mark.cpu_kernel


diffusers = pytest.importorskip("diffusers")
import diffusers_models as dm  # noqa: E402  (needs diffusers)

KINDS = ["flux", "sd3", "unet"]


@pytest.fixture(scope="module")
def components(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("diffusers")
    return {kind: dm.write_model(root / kind, kind, max_shard_size="40KB") for kind in KINDS}


def ours(folder: Path, settings: dict[str, Any], **kwargs: Any) -> Any:
    extra = {"compute_dtype": torch.bfloat16} if settings["bits"] == 4 else {}
    return leanstream.load(folder, device="cpu", progress=False, **settings, **extra, **kwargs)


def reference(folder: Path, settings: dict[str, Any], **kwargs: Any) -> Any:
    return dm.reference(
        folder,
        bits=settings["bits"],
        quant_type=settings.get("quant_type", "nf4"),
        double_quant=settings.get("double_quant", False),
        **kwargs,
    )


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("kind", KINDS)
def test_bit_identical_to_diffusers(components: dict[str, Path], kind: str, setting: str) -> None:
    folder = components[kind]
    assert len(list(folder.glob("*.safetensors"))) > 1, "the fixture must be sharded"
    kernel = exact_round_trip(SETTINGS[setting])
    ref = contiguous_inputs(reference(folder, SETTINGS[setting]))  # a UNet passes strided ones
    if kernel == "plain":
        plain_kernel(ref)
    got = ours(folder, SETTINGS[setting], cpu_kernel=kernel)
    assert type(got) is type(ref)
    # every tensor, quantized or not: same names, dtypes and values (before the reference
    # is converted to the fused CPU layout below, which bitsandbytes cannot save right)
    a = ref.state_dict()
    assert assert_same_weights(ref, got) > 0
    b = got.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name
    out = dm.forward(got)
    assert torch.isfinite(out).all()
    assert torch.equal(out, dm.forward(ref))


def test_unet_quantizes_linears_and_keeps_convolutions(components: dict[str, Path]) -> None:
    got = ours(components["unet"], SETTINGS["nf4"])
    convs = [m for m in got.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(m.weight.dtype == torch.bfloat16 for m in convs)
    linears = [m for m in got.modules() if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(m, bnb.nn.Linear4bit) for m in linears)


@pytest.mark.parametrize("setting", ["nf4", "int8"])
def test_markers_are_diffusers(components: dict[str, Path], setting: str) -> None:
    ref = reference(components["flux"], SETTINGS[setting])
    got = ours(components["flux"], SETTINGS[setting])
    for marker in (
        "is_quantized",
        "quantization_method",
        "is_loaded_in_4bit",
        "is_loaded_in_8bit",
        "is_4bit_serializable",
        "is_8bit_serializable",
    ):
        assert hasattr(got, marker) == hasattr(ref, marker), marker
        assert getattr(got, marker, None) == getattr(ref, marker, None), marker
    assert type(got.hf_quantizer) is type(ref.hf_quantizer)
    assert type(got.config.quantization_config) is diffusers.BitsAndBytesConfig
    mine, theirs = got.config.quantization_config, ref.config.quantization_config
    for field in ("load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "quant_method"):
        assert getattr(mine, field) == getattr(theirs, field), field
    assert got.training == ref.training
    assert {n: p.requires_grad for n, p in got.named_parameters()} == {
        n: p.requires_grad for n, p in ref.named_parameters()
    }


def test_a_pipeline_subfolder(tmp_path: Path) -> None:
    root = dm.write_pipeline_repo(tmp_path / "pipe", "flux")
    with pytest.raises(ConfigError, match=r"pipeline.*subfolder='transformer'"):
        leanstream.load(root, bits=4, device="cpu", progress=False)
    got = leanstream.load(root, subfolder="transformer", bits=4, device="cpu", progress=False)
    ref = dm.reference(root, subfolder="transformer", bits=4)
    assert assert_same_weights(ref, got) > 0


def test_a_pipeline_subfolder_from_the_offline_hub_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commit = "0" * 40
    cache = tmp_path / "hub"
    snapshot = cache / "models--org--tiny-flux" / "snapshots" / commit
    dm.write_pipeline_repo(snapshot, "flux")
    (cache / "models--org--tiny-flux" / "refs").mkdir()
    (cache / "models--org--tiny-flux" / "refs" / "main").write_text(commit)
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # read by huggingface_hub at import: set where it looks now too
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    got = leanstream.load(
        "org/tiny-flux",
        subfolder="transformer",
        cache_dir=cache,
        bits=4,
        device="cpu",
        progress=False,
    )
    ref = dm.reference(snapshot / "transformer", bits=4)
    assert assert_same_weights(ref, got) > 0


def test_variants(tmp_path: Path) -> None:
    folder = dm.write_flux(tmp_path / "flux", seed=1)
    dm.write_flux(folder, variant="fp16", dtype=torch.float16, seed=2, max_shard_size="40KB")
    with pytest.raises(ConfigError, match="fp16"):
        leanstream.load(folder, bits=4, device="cpu", progress=False)
    got = leanstream.load(folder, variant="fp16", bits=4, device="cpu", progress=False)
    ref = dm.reference(folder, variant="fp16", bits=4, dtype=torch.float16)
    assert assert_same_weights(ref, got) > 0


def test_model_class_does_not_apply_to_diffusers(components: dict[str, Path]) -> None:
    from transformers import AutoModel

    with pytest.raises(ConfigError, match="diffusers config"):
        leanstream.load(components["flux"], model_class=AutoModel, device="cpu", progress=False)


@pytest.mark.parametrize("setting", ["nf4", "nf4-dq", "int8"])
def test_save_is_read_by_diffusers_and_by_leanstream(
    components: dict[str, Path], tmp_path: Path, setting: str
) -> None:
    kernel = exact_round_trip(SETTINGS[setting])
    got = ours(components["sd3"], SETTINGS[setting], cpu_kernel=kernel)
    saved = leanstream.save(got, tmp_path / "saved", progress=False)
    config = json.loads((saved / "config.json").read_text())
    assert config["_class_name"] == "SD3Transformer2DModel"
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    assert list(saved.glob("diffusion_pytorch_model*.safetensors"))
    # diffusers reads it as a pre-quantized checkpoint (on the CPU: GPU check patched)
    with dm.cpu_bitsandbytes():
        theirs = diffusers.SD3Transformer2DModel.from_pretrained(
            saved, torch_dtype=torch.bfloat16, device_map="cpu"
        )
    # and leanstream streams the packed tensors back without requantizing
    again = leanstream.load(saved, device="cpu", progress=False, cpu_kernel=kernel)
    if kernel == "plain":
        plain_kernel(theirs)
    # (compared before any forward: LLM.int8's first one moves SCB off the weight)
    assert assert_same_weights(got, theirs) > 0
    assert assert_same_weights(got, again) > 0
    assert again.hf_quantizer.pre_quantized
    assert torch.equal(dm.forward(theirs), dm.forward(got))
    assert torch.equal(dm.forward(again), dm.forward(got))


def test_prequantized_by_diffusers_loads_as_stored(
    components: dict[str, Path], tmp_path: Path
) -> None:
    ref = reference(components["flux"], SETTINGS["nf4-dq"])
    ref.save_pretrained(tmp_path / "bnb")
    got = leanstream.load(tmp_path / "bnb", device="cpu", progress=False)
    assert assert_same_weights(ref, got) > 0
    assert got.config.quantization_config.bnb_4bit_use_double_quant
    with pytest.raises(ConfigError, match="pre-quantized"):
        leanstream.load(tmp_path / "bnb", bits=8, device="cpu", progress=False)


def test_a_diffusers_model_through_load_into(components: dict[str, Path]) -> None:
    config = diffusers.FluxTransformer2DModel.load_config(components["flux"])
    got = leanstream.load_into(
        lambda: diffusers.FluxTransformer2DModel.from_config(config),
        components["flux"],
        bits=4,
        compute_dtype=torch.bfloat16,
        device="cpu",
        progress=False,
    )
    ref = reference(components["flux"], SETTINGS["nf4"])
    assert assert_same_weights(ref, got) > 0
    assert got.is_loaded_in_4bit


@pytest.mark.parametrize("setting", ["nf4", "int8"])
def test_keep_in_fp32_modules_as_diffusers_matches_them(
    components: dict[str, Path], monkeypatch: pytest.MonkeyPatch, setting: str
) -> None:
    """``"norm"`` keeps ``single_transformer_blocks.0.norm.linear`` out of quantization
    and in float32 (diffusers matches a pattern anywhere in the name, as ``norm.``)."""
    monkeypatch.setattr(diffusers.FluxTransformer2DModel, "_keep_in_fp32_modules", ["norm"])
    ref = reference(components["flux"], SETTINGS[setting])
    got = ours(components["flux"], SETTINGS[setting])
    kept = got.get_submodule("single_transformer_blocks.0.norm.linear")
    assert type(kept) is nn.Linear and kept.weight.dtype == torch.float32
    a = ref.state_dict()  # before assert_same_weights converts it to the fused CPU layout
    assert assert_same_weights(ref, got) > 0
    b = got.state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
