"""Building a transformers model with parameters on ``meta`` and buffers real.

Why not ``with torch.device("meta")``: every tensor created in ``__init__``
would be a meta tensor, including non-persistent buffers such as rotary
``inv_freq`` that are *computed* there and never stored in a checkpoint; after
``to_empty`` they hold garbage (transformers #34234, #45902).

Why not accelerate's ``init_empty_weights``: it swaps
``nn.Module.register_parameter`` for the duration of a ``with`` block, for every
thread of the process; two loads in two threads restore each other's patch
(diffusers #4296, peft #3605).

What we do: ``nn.Module.register_parameter`` is wrapped once, for good, by a
function that only acts in a thread that is inside :func:`empty_parameters`
(a thread-local flag); everywhere else it is the original. Inside, each
parameter is moved to ``meta`` as it is registered (and marked initialized,
so that transformers' ``_init_weights`` skips it), while buffers are computed
for real, exactly as a normally constructed model computes them.

Buffers take the dtype transformers gives them: ``from_pretrained`` builds the
model under ``torch.set_default_dtype(dtype)``, so a buffer computed in the
default dtype (XGLM's sinusoidal positions, OpenAI-GPT's causal mask, Falcon-H1's
``mup_vector``) is in the model's dtype, while one the model computes explicitly
in float32 (rotary ``inv_freq``) stays float32. :func:`build_empty_model` builds
under the same switch; it is process-wide, so builds take a lock for its duration.
Their values are those ``from_pretrained`` leaves: it runs ``_init_weights`` on the
modules holding non-persistent buffers after the switch (GPT-J's sinusoidal positions
come from a float32 ``inv_freq`` there); so does :func:`build_empty_model`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

_state = threading.local()
_install_lock = threading.Lock()
_original_register_parameter = nn.Module.register_parameter
#: held while a build has torch's (process-wide) default dtype switched
_default_dtype_lock = threading.Lock()


def _register_parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
    _original_register_parameter(self, name, param)
    if param is not None and getattr(_state, "depth", 0) > 0 and param.device.type != "meta":
        if type(param) is nn.Parameter:
            empty = nn.Parameter(param.data.to("meta"), requires_grad=param.requires_grad)
        else:
            empty = param.to("meta")
        # transformers' init functions skip tensors so marked: initializing meta
        # tensors computes nothing but costs ~0.1 s of Python at 8B shapes
        empty._is_hf_initialized = True
        self._parameters[name] = empty


def _install() -> None:
    with _install_lock:
        if nn.Module.register_parameter is not _register_parameter:
            nn.Module.register_parameter = _register_parameter  # type: ignore[method-assign]


@contextmanager
def _default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """Within this block, ``torch.get_default_dtype()`` is ``dtype`` (when it is one
    torch accepts as default: float16, bfloat16, float32, float64), as in
    transformers' ``local_torch_dtype``. The switch is process-wide: the lock keeps
    two builds from restoring each other's dtype."""
    if dtype is None or dtype not in _DEFAULT_DTYPES:
        yield
        return
    with _default_dtype_lock:
        original = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(original)


_DEFAULT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@contextmanager
def empty_parameters() -> Iterator[None]:
    """Within this block, in this thread only, new parameters live on ``meta``.

    >>> with empty_parameters():
    ...     layer = nn.Linear(4096, 4096)
    >>> layer.weight.device.type
    'meta'
    """
    _install()
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


def build_empty_model(
    config: Any,
    *,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    model_class: Any = None,
    dtype: torch.dtype | None = None,
) -> Any:
    """Instantiate ``model_class`` (a transformers model class or ``Auto*`` class;
    default: the first transformers class ``config.architectures`` names, the one
    the checkpoint was saved from, else the causal LM class of ``config``) for
    ``config``, with empty parameters.

    Buffers (persistent or not) are real, on the CPU, with the values the model's
    ``__init__`` computes, built (as ``from_pretrained`` builds them) with ``dtype``
    (default: ``config.dtype``) as torch's default dtype, so that a buffer computed
    in the default dtype has the model's dtype. ``attn_implementation`` is passed
    on, as ``from_pretrained`` does. Raises :class:`ConfigError` when transformers
    has no such class for this config, or refuses the attention implementation.
    """
    cls = model_class if model_class is not None else _default_class(config, trust_remote_code)
    # dtype=None: from_config would otherwise call torch.set_default_dtype unguarded,
    # and two builds in two threads could restore each other's default dtype;
    # _default_dtype switches it under a lock. Parameters are on meta (their dtype
    # is chosen when they are loaded); buffers get it from the default dtype.
    configured = getattr(config, "dtype", None)
    if dtype is None and isinstance(configured, torch.dtype):
        dtype = configured
    elif dtype is None and isinstance(configured, str):
        dtype = getattr(torch, configured, None)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if _is_auto(cls):
        extra["trust_remote_code"] = trust_remote_code
    construct = getattr(cls, "from_config", None) if _is_auto(cls) else None
    if construct is None:
        construct = getattr(cls, "_from_config", None)
    if construct is None:
        raise ConfigError(f"model_class={cls!r} is not a transformers model or Auto* class")
    try:
        with _default_dtype(dtype), empty_parameters():
            model = construct(config, dtype=None, **extra)
    except ValueError as err:
        if attn_implementation and attn_implementation in str(err):
            raise ConfigError(f"attn_implementation={attn_implementation!r}: {err}") from err
        raise ConfigError(
            f"{getattr(cls, '__name__', cls)} cannot be built for model_type "
            f"{getattr(config, 'model_type', None)!r}: {err}"
        ) from err
    except Exception as err:  # a hostile config value (0 heads, negative sizes, ...)
        folder = getattr(config, "name_or_path", "")
        raise ConfigError(
            f"{folder + '/' if folder else ''}config.json: transformers cannot build the "
            f"model from it: {type(err).__name__}: {err}"
        ) from err
    finally:
        config.dtype = configured
    with _default_dtype_lock:  # the process' default dtype, not another build's switch
        _initialize_buffers(model)
    model.config.dtype = configured
    model.eval()
    model.requires_grad_(False)
    return model


def _initialize_buffers(model: Any) -> None:
    """What ``from_pretrained`` does last: ``_init_weights`` on every module holding a
    non-persistent buffer, in the process' default dtype (outside the build's switch),
    so that a buffer it recomputes has transformers' values: GPT-J's sinusoidal
    positions from a float32 ``inv_freq``, not the bfloat16 one ``__init__`` made
    under the switch. The buffer keeps its dtype (``init.copy_`` writes into it);
    parameters, on meta and marked initialized, are left alone."""
    init = getattr(model, "_init_weights", None)
    if init is None:
        return
    with torch.no_grad():
        for module in model.modules():
            if any(
                module._buffers.get(name) is not None for name in module._non_persistent_buffers_set
            ):
                init(module)


def _is_auto(cls: Any) -> bool:
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    return isinstance(cls, type) and issubclass(cls, _BaseAutoModelClass)


def _default_class(config: Any, trust_remote_code: bool) -> Any:
    """The class the checkpoint was saved from: the transformers class
    ``config.architectures`` names first (as transformers' pipelines choose); else
    ``AutoModelForCausalLM`` when it knows ``config``. With ``trust_remote_code``, a
    checkpoint whose own code names a causal LM class (``auto_map``) builds that."""
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and "AutoModelForCausalLM" in auto_map:
        return AutoModelForCausalLM
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return AutoModelForCausalLM
    raise ConfigError(
        f"transformers has no causal LM class for model_type "
        f"{getattr(config, 'model_type', None)!r}, and its config names no transformers "
        f"class in architectures ({getattr(config, 'architectures', None)!r}): pass "
        "model_class= (AutoModel, AutoModelForSeq2SeqLM, a model class, ...)"
    )


def build_diffusers_model(cls: Any, folder: Any) -> Any:
    """Instantiate the diffusers model class ``cls`` from ``folder``'s ``config.json``
    (as ``from_pretrained`` does, with ``from_config``), with empty parameters and
    real buffers, in eval mode."""
    config = dict(cls.load_config(folder))
    config.pop("quantization_config", None)  # read by the loader, not an __init__ argument
    try:
        with empty_parameters():
            model = cls.from_config(config)
    except Exception as err:  # a hostile config value
        raise ConfigError(
            f"{folder}/config.json: diffusers cannot build {cls.__name__} from it: "
            f"{type(err).__name__}: {err}"
        ) from err
    model.register_to_config(_name_or_path=str(folder))  # as from_pretrained does
    model.eval()
    model.requires_grad_(False)
    return model


def meta_tensors(model: nn.Module) -> list[str]:
    """Names of parameters and buffers of ``model`` still on ``meta``."""
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta]
    names += [n for n, b in model.named_buffers(remove_duplicate=False) if b.is_meta]
    return names


__all__ = ["build_diffusers_model", "build_empty_model", "empty_parameters", "meta_tensors"]
