"""Tiny random diffusers components for tests (no network: built from configs), and diffusers'
own bitsandbytes quantization of them on the CPU as the reference.

A component folder is what ``save_pretrained`` writes and the hub holds: ``config.json``
(with ``_class_name``) and ``diffusion_pytorch_model*.safetensors`` (sharded with an index
when ``max_shard_size`` asks, ``.fp16``-style names with ``variant``).
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import diffusers
import torch
from diffusers.quantizers.bitsandbytes import bnb_quantizer

# kind -> (diffusers class name, config): small but real architectures. Every nn.Linear has
# in_features a multiple of 64 (the 4-bit blocksize) and out_features a multiple of 32, as in
# the real models: on an AVX512-BF16 CPU bitsandbytes repacks each 4-bit weight at its first
# forward (``_convert_weight_packed_for_cpu``) and fails on other shapes, so diffusers'
# reference would fail there.
TINY: dict[str, tuple[str, dict[str, Any]]] = {
    # FLUX.1-dev's layout (guidance embedding, packed 2x2 latents of 16 channels: 64 in)
    "flux": (
        "FluxTransformer2DModel",
        dict(
            patch_size=1,
            in_channels=64,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=32,
            num_attention_heads=2,
            joint_attention_dim=64,
            pooled_projection_dim=64,
            guidance_embeds=True,
            axes_dims_rope=(8, 12, 12),  # sums to attention_head_dim
        ),
    ),
    # SD3.5's layout: a dual-attention first block, RMS query/key norms, a stored pos_embed
    "sd3": (
        "SD3Transformer2DModel",
        dict(
            sample_size=32,
            patch_size=2,
            in_channels=16,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=4,
            joint_attention_dim=64,
            caption_projection_dim=64,  # = heads * head dim
            pooled_projection_dim=64,
            out_channels=16,
            pos_embed_max_size=16,
            dual_attention_layers=(0,),
            qk_norm="rms_norm",
        ),
    ),
    # SD2/SDXL's UNet layout (linear projections in and out of the transformers, so they
    # are quantized; convolutions are kept)
    "unet": (
        "UNet2DConditionModel",
        dict(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(64, 64),
            layers_per_block=1,
            norm_num_groups=8,
            cross_attention_dim=64,
            attention_head_dim=8,
            use_linear_projection=True,
        ),
    ),
}

# kind -> (pipeline class, component subfolder), for write_pipeline_repo
PIPELINES = {
    "flux": ("FluxPipeline", "transformer"),
    "sd3": ("StableDiffusion3Pipeline", "transformer"),
    "unet": ("StableDiffusionPipeline", "unet"),
}


def make_model(kind: str, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16, **overrides: Any):
    """A ``TINY[kind]`` model with random weights from a generator seeded with ``seed``.

    Every weight and bias is normal * 0.02; the scales of norms (1-D parameters named
    ``weight``) are 1 + normal * 0.02, so nothing is constant. Made in float32, cast to
    ``dtype``. The caller's global RNG is left as it was.
    """
    cls_name, kwargs = TINY[kind]
    with torch.random.fork_rng(devices=[]):  # the constructor's own init draws from it
        model = getattr(diffusers, cls_name).from_config({**kwargs, **overrides})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.02
            if param.dim() == 1 and name.endswith("weight"):
                noise += 1.0
            param.copy_(noise)
    # nn.Module's own cast: ModelMixin.to logs a warning about float32 modules (none here)
    return torch.nn.Module.to(model, dtype).eval()


def write_model(
    folder: Path,
    kind: str,
    *,
    variant: str | None = None,
    max_shard_size: str | int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    **overrides: Any,
) -> Path:
    """Write a random ``TINY[kind]`` component with diffusers' ``save_pretrained``."""
    model = make_model(kind, seed=seed, dtype=dtype, **overrides)
    extra = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(folder, variant=variant, **extra)
    return Path(folder)


def write_flux(folder: Path, **options: Any) -> Path:
    """A tiny FluxTransformer2DModel folder (:func:`write_model` options)."""
    return write_model(folder, "flux", **options)


def write_sd3(folder: Path, **options: Any) -> Path:
    """A tiny SD3Transformer2DModel folder (:func:`write_model` options)."""
    return write_model(folder, "sd3", **options)


def write_unet(folder: Path, **options: Any) -> Path:
    """A tiny UNet2DConditionModel folder (:func:`write_model` options)."""
    return write_model(folder, "unet", **options)


def write_pipeline_repo(root: Path, kind: str = "flux", **options: Any) -> Path:
    """A diffusers pipeline layout: ``model_index.json``, the ``TINY[kind]`` component in
    its subfolder (``transformer/`` or ``unet/``) and a scheduler config; the other
    components are named in the index but not written. Returns ``root``."""
    pipeline, subfolder = PIPELINES[kind]
    write_model(root / subfolder, kind, **options)
    scheduler = "FlowMatchEulerDiscreteScheduler" if subfolder == "transformer" else "PNDMScheduler"
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": scheduler, "_diffusers_version": diffusers.__version__})
    )
    index = {
        "_class_name": pipeline,
        "_diffusers_version": diffusers.__version__,
        subfolder: ["diffusers", TINY[kind][0]],
        "scheduler": ["diffusers", scheduler],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return Path(root)


def _with_cuda_reported(method):
    """``method`` run while ``torch.cuda.is_available()`` answers True, and only then."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with mock.patch.object(torch.cuda, "is_available", return_value=True):
            return method(self, *args, **kwargs)

    return wrapper


@contextlib.contextmanager
def cpu_bitsandbytes() -> Iterator[None]:
    """Let diffusers' bitsandbytes quantizers run on a machine without a GPU.

    PATCHES DIFFUSERS' GPU CHECK, nothing else. ``validate_environment`` of
    ``BnB4BitDiffusersQuantizer`` and ``BnB8BitDiffusersQuantizer`` raises "No GPU found. A
    GPU is needed for quantization." unless ``torch.cuda`` (or xpu, mps) is available,
    although bitsandbytes >= 0.49 quantizes on the CPU: ``Params4bit.to("cpu")`` and
    ``Int8Params.to("cpu")`` quantize there. Inside this context that method runs with
    ``torch.cuda.is_available()`` reporting True for the duration of the call only; its other
    checks (accelerate and bitsandbytes versions, no weights mapped to "cpu" in a
    multi-device map) still run, and nothing else sees CUDA reported. With
    ``device_map=None`` diffusers also asks ``update_device_map`` for the current
    accelerator (``torch.cuda.current_device()``, which fails): inside this context it
    leaves None as it is, and diffusers then puts every weight on the CPU.
    """
    classes = (bnb_quantizer.BnB4BitDiffusersQuantizer, bnb_quantizer.BnB8BitDiffusersQuantizer)
    with contextlib.ExitStack() as stack:
        for cls in classes:
            stack.enter_context(
                mock.patch.object(
                    cls, "validate_environment", _with_cuda_reported(cls.validate_environment)
                )
            )
            stack.enter_context(
                mock.patch.object(cls, "update_device_map", lambda self, device_map: device_map)
            )
        yield


def bnb_config(
    bits: int,
    quant_type: str = "nf4",
    double_quant: bool = False,
    compute_dtype: torch.dtype = torch.bfloat16,
) -> diffusers.BitsAndBytesConfig:
    """diffusers' ``BitsAndBytesConfig`` for these settings."""
    if bits == 8:
        return diffusers.BitsAndBytesConfig(load_in_8bit=True)
    if bits != 4:
        raise ValueError(f"bits must be 4 or 8, not {bits}")
    return diffusers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def reference(
    folder: Path,
    *,
    bits: int,
    quant_type: str = "nf4",
    double_quant: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    compute_dtype: torch.dtype | None = None,
    variant: str | None = None,
    subfolder: str | None = None,
    device_map: str | None = "cpu",
):
    """diffusers' own bitsandbytes quantization of the component in ``folder``, on the CPU
    (:func:`cpu_bitsandbytes`): ``from_pretrained`` of the class its ``config.json`` names.

    ``compute_dtype`` (4 bits) defaults to ``dtype``, as in leanstream; diffusers' own
    ``BitsAndBytesConfig`` defaults to float32.
    """
    config_dir = Path(folder) / subfolder if subfolder else Path(folder)
    cls_name = json.loads((config_dir / "config.json").read_text())["_class_name"]
    config = bnb_config(bits, quant_type, double_quant, compute_dtype or dtype)
    with cpu_bitsandbytes():
        return getattr(diffusers, cls_name).from_pretrained(
            folder,
            subfolder=subfolder,
            quantization_config=config,
            torch_dtype=dtype,
            device_map=device_map,
            variant=variant,
        )


def forward_inputs(
    model: torch.nn.Module, seed: int = 0, *, dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """Small deterministic inputs for one forward pass of ``model`` (a TINY kind, or any
    size of the same classes): ``model(**forward_inputs(model))``."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(dtype)

    if isinstance(model, diffusers.FluxTransformer2DModel):
        side, text = 4, 8  # a 4x4 grid of packed latents, 8 text tokens
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
        inputs = dict(
            hidden_states=randn(1, side * side, config.in_channels),
            encoder_hidden_states=randn(1, text, config.joint_attention_dim),
            pooled_projections=randn(1, config.pooled_projection_dim),
            timestep=torch.tensor([0.5], dtype=dtype),
            img_ids=img_ids.to(dtype),
            txt_ids=torch.zeros(text, 3, dtype=dtype),
        )
        if config.guidance_embeds:
            inputs["guidance"] = torch.tensor([3.5], dtype=dtype)
        return inputs
    if isinstance(model, diffusers.SD3Transformer2DModel):
        return dict(
            hidden_states=randn(1, config.in_channels, 8, 8),
            encoder_hidden_states=randn(1, 8, config.joint_attention_dim),
            pooled_projections=randn(1, config.pooled_projection_dim),
            timestep=torch.tensor([500.0], dtype=dtype),
        )
    if isinstance(model, diffusers.UNet2DConditionModel):
        return dict(
            sample=randn(1, config.in_channels, 8, 8),
            timestep=torch.tensor([10]),
            encoder_hidden_states=randn(1, 8, config.cross_attention_dim),
        )
    raise TypeError(f"no inputs for a {type(model).__name__}")


def forward(model: torch.nn.Module, seed: int = 0, **options: Any) -> torch.Tensor:
    """``model``'s output tensor for :func:`forward_inputs` (no gradients)."""
    with torch.no_grad():
        return model(**forward_inputs(model, seed, **options), return_dict=False)[0]


def _self_check() -> None:
    """``python tests/diffusers_models.py``: reference() of every kind at nf4 and int8 gives
    quantized layers (and keeps the convolutions) and a finite forward. Not a test: a check
    of the helpers themselves, run by hand."""
    import tempfile

    import bitsandbytes as bnb

    with tempfile.TemporaryDirectory() as tmp:
        for kind in TINY:
            folder = write_model(Path(tmp) / kind, kind)
            size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
            for bits in (4, 8):
                model = reference(folder, bits=bits)
                layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
                if bits == 4:
                    assert all(isinstance(m, bnb.nn.Linear4bit) for m in layers)
                    assert all(type(m.weight) is bnb.nn.Params4bit for m in layers)
                    assert all(m.weight.bnb_quantized for m in layers)
                    assert all(m.weight.dtype == torch.uint8 for m in layers)
                    assert all(
                        m.weight.numel() * 2 == m.in_features * m.out_features for m in layers
                    )
                    assert all(m.in_features % 64 == 0 == m.out_features % 32 for m in layers)
                else:
                    assert all(isinstance(m, bnb.nn.Linear8bitLt) for m in layers)
                    assert all(m.weight.dtype == torch.int8 for m in layers)
                    assert all(m.weight.SCB is not None for m in layers)
                convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
                assert all(m.weight.dtype == torch.bfloat16 for m in convs)
                out = forward(model)
                assert torch.isfinite(out).all() and out.abs().max() > 0
                print(
                    f"{kind} {bits}-bit: {size / 1024:.0f} KiB, {len(layers)} quantized linear "
                    f"layers, {len(convs)} convolutions kept, output {tuple(out.shape)} "
                    f"std {out.float().std():.3g}"
                )


if __name__ == "__main__":
    _self_check()
