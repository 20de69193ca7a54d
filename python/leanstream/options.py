"""``load()``'s options: the keywords transformers users type, mapped onto leanstream's.

``from_pretrained`` habits carry over: ``torch_dtype`` (the old name of
``dtype``), ``quantization_config`` (a ``BitsAndBytesConfig`` as the source of the
quantization options), ``load_in_4bit`` / ``load_in_8bit``, ``device_map`` (one
device, or a plan across devices: :mod:`leanstream.placement`), ``low_cpu_mem_usage`` (accepted:
leanstream always streams). An option that contradicts another, or that would
do nothing, is a :class:`ConfigError`, never silently dropped.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import ConfigError

#: ``load()``'s defaults for the options transformers' keywords may set.
DEFAULTS: dict[str, Any] = {
    "bits": "auto",
    "quant_type": "nf4",
    "double_quant": False,
    "compute_dtype": None,
    "blocksize": 64,
    "quant_storage": torch.uint8,
    "threshold": 6.0,
    "skip_modules": None,
    "dtype": "auto",
    "device": None,
}

#: the ``BitsAndBytesConfig`` field each option is read from (:func:`_from_bnb_config`)
CONFIG_FIELDS = {
    "bits": "load_in_4bit/load_in_8bit",
    "quant_type": "bnb_4bit_quant_type",
    "double_quant": "bnb_4bit_use_double_quant",
    "compute_dtype": "bnb_4bit_compute_dtype",
    "quant_storage": "bnb_4bit_quant_storage",
    "threshold": "llm_int8_threshold",
    "skip_modules": "llm_int8_skip_modules",
}

#: options that only mean something for 4-bit (``bits=4``) or LLM.int8 (``bits=8``)
FOUR_BIT = ("quant_type", "double_quant", "compute_dtype", "blocksize", "quant_storage")
EIGHT_BIT = ("threshold",)


class Default:
    """An option's default, told apart from the same value given explicitly.

    ``quant_type="nf4"`` typed by the caller contradicts a ``quantization_config``
    that says fp4; ``quant_type`` left out does not. ``load()``'s signature holds
    ``Default("nf4")`` (its repr is ``'nf4'``, so ``help(load)`` reads as before) and
    :func:`resolve` replaces it by its value.
    """

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


#: ``load()``'s keyword defaults, as :class:`Default` (``LEFT_OUT["quant_type"]``)
LEFT_OUT: dict[str, Any] = {key: Default(value) for key, value in DEFAULTS.items()}


def _unset(key: str, value: Any) -> bool:
    """Whether ``value`` leaves option ``key`` to another source: a :class:`Default`,
    or a default that means "choose for me" (``None``, ``"auto"``) given as such."""
    if isinstance(value, Default):
        return True
    chooses = DEFAULTS[key] is None or DEFAULTS[key] == "auto"
    return chooses and _same(value, DEFAULTS[key])


def resolve(
    options: dict[str, Any],
    *,
    torch_dtype: Any = None,
    quantization_config: Any = None,
    load_in_4bit: bool | None = None,
    load_in_8bit: bool | None = None,
    device_map: Any = None,
) -> dict[str, Any]:
    """``options`` (leanstream's own, as given) updated from transformers' keywords.

    A transformers keyword sets an option left out (a :class:`Default`, or ``None`` /
    ``"auto"``); an option given both ways, even one given explicitly as its default
    (``quant_type="nf4"`` with a ``quantization_config`` that says fp4), must agree,
    or it is a :class:`ConfigError` naming both values.
    """
    unset = {key for key, value in options.items() if _unset(key, value)}
    options = {k: v.value if isinstance(v, Default) else v for k, v in options.items()}

    def merge(key: str, value: Any, source: str) -> None:
        current = options[key]
        if key in unset or _same(current, value):
            options[key] = value
            unset.discard(key)  # set now: a later keyword must agree with it
        else:
            raise ConfigError(f"{key}={current!r} contradicts {source} ({value!r})")

    if torch_dtype is not None:
        merge("dtype", torch_dtype, f"torch_dtype={torch_dtype!r}")
    if load_in_4bit and load_in_8bit:
        raise ConfigError("load_in_4bit=True and load_in_8bit=True: pick one")
    if quantization_config is not None:
        for key, value in _from_bnb_config(quantization_config).items():
            merge(key, value, f"quantization_config.{CONFIG_FIELDS[key]}")
    if load_in_4bit:
        merge("bits", 4, "load_in_4bit=True")
    if load_in_8bit:
        merge("bits", 8, "load_in_8bit=True")
    options["device_map"] = None
    if device_map is not None:
        one = _one_device(device_map, check=False)
        if one is not None:
            merge("device", one, f"device_map={device_map!r}")  # a contradiction first
            _one_device(device_map)  # then whether that device is there
        elif options["device"] is not None:
            raise ConfigError(
                f"device={options['device']!r} and device_map={device_map!r}: pass one of them"
            )
        options["device_map"] = device_map  # recorded as hf_device_map; planned if several
    return options


def check(options: dict[str, Any], bits: int) -> None:
    """Refuse options that would do nothing at ``bits`` (4, 8, or 16: none)."""
    for applies, keys, what in (
        (4, FOUR_BIT, "4-bit option(s)"),
        (8, EIGHT_BIT, "LLM.int8 option(s) (bits=8)"),
    ):
        given = [k for k in keys if not _same(options[k], DEFAULTS[k])]
        if bits != applies and given:
            raise ConfigError(
                f"{', '.join(f'{k}={options[k]!r}' for k in given)}: {what}, but "
                f"bits={bits if bits != 16 else None!r}"
            )
    if bits == 16 and options["skip_modules"]:
        raise ConfigError(
            f"skip_modules={options['skip_modules']!r} with bits=None: nothing is quantized"
        )


def _same(a: Any, b: Any) -> bool:
    """Equal options; a dtype and its name (``torch.bfloat16``, ``"bfloat16"``) are one."""
    a, b = _as_dtype(a), _as_dtype(b)
    return (type(a) is type(b) and a == b) or (_number(a) and _number(b) and a == b)


def _as_dtype(value: Any) -> Any:
    if isinstance(value, str):
        dtype = getattr(torch, value.removeprefix("torch."), None)
        if isinstance(dtype, torch.dtype):
            return dtype
    return value


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _from_bnb_config(config: Any) -> dict[str, Any]:
    """The leanstream options a ``BitsAndBytesConfig`` (or its dict) stands for."""
    from transformers import BitsAndBytesConfig

    if isinstance(config, dict):
        config = BitsAndBytesConfig.from_dict(config)
    if not isinstance(config, BitsAndBytesConfig):
        raise ConfigError(
            f"quantization_config must be a BitsAndBytesConfig (leanstream quantizes with "
            f"bitsandbytes), not {type(config).__name__}"
        )
    if config.llm_int8_enable_fp32_cpu_offload:
        raise ConfigError(
            "quantization_config: llm_int8_enable_fp32_cpu_offload needs multi-device "
            "placement, which leanstream does not do yet"
        )
    if config.llm_int8_has_fp16_weight:
        raise ConfigError(
            "quantization_config: llm_int8_has_fp16_weight=True keeps fp16 weights for "
            "training; leanstream loads int8 weights only"
        )
    out: dict[str, Any] = {}
    if config.load_in_4bit:
        out.update(
            bits=4,
            quant_type=config.bnb_4bit_quant_type,
            double_quant=bool(config.bnb_4bit_use_double_quant),
            # BitsAndBytesConfig's own default is float32, as transformers computes
            compute_dtype=config.bnb_4bit_compute_dtype,
            quant_storage=config.bnb_4bit_quant_storage,
        )
    elif config.load_in_8bit:
        out.update(bits=8, threshold=float(config.llm_int8_threshold))
    else:
        raise ConfigError("quantization_config has neither load_in_4bit nor load_in_8bit")
    if config.llm_int8_skip_modules is not None:
        out["skip_modules"] = list(config.llm_int8_skip_modules)
    return out


def _one_device(device_map: Any, *, check: bool = True) -> Any:
    """The one device a ``device_map`` names, or None when it places modules on several
    devices or names a strategy (``"auto"``, ...): that plan is made by
    :mod:`leanstream.placement`. ``check``: refuse a CUDA device this machine lacks."""
    from .placement import EXPECTED, STRATEGIES

    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) == 1:
            (device,) = devices
            if isinstance(device, int):
                device = torch.device(device)
            return _available(device, device_map, f"{device!r} is not a device", check)
        if not devices:
            raise ConfigError("device_map={}: places nothing")
        return None
    if isinstance(device_map, str) and device_map in STRATEGIES:
        return None
    if isinstance(device_map, str):
        return _available(device_map, device_map, EXPECTED, check)
    if isinstance(device_map, int | torch.device):
        device = torch.device(device_map) if isinstance(device_map, int) else device_map
        return _available(device, device_map, EXPECTED, check)
    raise ConfigError(f"device_map={device_map!r}: {EXPECTED}")


def _available(device: Any, device_map: Any, otherwise: str, check: bool = True) -> Any:
    """``device``, the one device ``device_map`` names, checked here so that a
    message names ``device_map`` (the caller's), not ``device``; ``otherwise``: what
    to say when it is not a device."""
    from .placement import check_available

    if device == "disk":  # refused with the plans
        return device
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"device_map={device_map!r}: {otherwise}") from err
    if check and parsed.type == "cuda":
        check_available(parsed.index or 0, f"device_map={device_map!r}")
    return device


def single_device(device_map: Any) -> bool:
    """Whether ``device_map`` names one device (not a plan across devices)."""
    return _one_device(device_map) is not None


__all__ = ["DEFAULTS", "LEFT_OUT", "Default", "check", "resolve", "single_device"]
