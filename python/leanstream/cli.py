"""The ``leanstream`` command line (also ``python -m leanstream``).

::

    leanstream inspect SOURCE                    # shards, tensors, parameters, predicted memory
    leanstream inspect SOURCE --device-map auto --max-memory 0=22GiB,1=22GiB  # + load's plan
    leanstream quantize SOURCE OUT --bits 4      # stream-quantize and save a pre-quantized folder
    leanstream generate SOURCE --prompt "..."    # load (quantized) and generate greedily

``SOURCE`` is a local folder or a Hugging Face hub repo id: a transformers model, or a
diffusers component (``--subfolder transformer`` of a pipeline); every command takes
:func:`leanstream.load`'s ``--subfolder``, ``--variant`` and ``--model-class``. Errors
print one line, ``leanstream: error: ...``, to stderr and exit with 2 (usage) or 1 (a
:class:`~leanstream.LeanstreamError`, an operating-system error such as a full disk, or
any other exception, named with its type and the package it came from); ``--verbose``
prints the traceback above that line. Ctrl-C prints ``leanstream: interrupted`` and exits
with 130, also while torch and transformers are being imported (on first use, inside
:func:`main`). Sizes are printed in binary units (KiB, MiB, GiB).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from .errors import ConfigError, LeanstreamError
from .progress import format_bytes

PROG = "leanstream"
_DTYPES = ["bfloat16", "float16", "float32"]

#: library messages only ``--verbose`` shows: logger -> how the message starts. The first two
#: are logging warnings of bitsandbytes 0.50: the first comes with every 8-bit matmul whose
#: input is not float16 (hundreds in one generate), the second from its import on a CPU with
#: AVX512-BF16 when the optional ``kernels`` package is missing (every command). The third is
#: accelerate's, for each GPU index of a plan that this machine lacks: ``inspect --device-map``
#: plans for GPUs that need not be there.
QUIET_BY_DEFAULT = {
    "bitsandbytes.autograd._functions": "MatMul8bitLt: inputs will be cast",
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward",
    "accelerate.utils.modeling": "Device ",
}

#: Python warnings only ``--verbose`` shows: module -> how the message starts. accelerate's
#: planner warns that a plan with CPU modules leaves no GPU room for their buffers, which
#: leanstream does not move (its CPU modules run on the CPU).
QUIET_WARNINGS = {"accelerate.utils.modeling": "Current model requires"}

#: the ``device_map`` strategies ``inspect --device-map`` plans: those of
#: :data:`leanstream.placement.STRATEGIES`, named here so that ``--help`` imports no torch
_STRATEGIES = ["auto", "balanced", "balanced_low_0", "sequential"]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit status 2)."""

    def error(self, message: str) -> NoReturn:
        hint = f" (see '{self.prog} --help')"
        self.exit(2, f"{PROG}: error: {message}{hint}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit status.

    >>> main(["inspect", "path/to/model"])  # doctest: +SKIP
    0
    """
    try:  # everything: torch, transformers and bitsandbytes are imported in here, on first use
        return _main(argv)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _main(argv: Sequence[str] | None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        conflict = _conflict(args)
        if conflict is not None:
            args.command_parser.error(conflict)
    except SystemExit as exit_:  # --help, or a usage error already printed
        return exit_.code if isinstance(exit_.code, int) else 0
    with _quiet_libraries(enabled=not args.verbose):
        try:
            return int(args.run(args) or 0)
        except Exception as err:
            if args.verbose:
                traceback.print_exc()
            message = _describe(err, args.command, verbose=args.verbose)
            if isinstance(err, LeanstreamError):  # its hints, as this command spells them
                message = _as_flags(message, args.command_parser)
            return _fail(message)


def _describe(err: Exception, command: str, *, verbose: bool) -> str:
    """One line for any exception: ours and the operating system's as they are, anything
    else (bitsandbytes' assertions, a bug) with its type and the package that raised it."""
    if isinstance(err, LeanstreamError):
        return str(err)
    if isinstance(err, OSError):
        return f"{err.strerror or err}: {err.filename}" if err.filename else str(err)
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    module = str(tb.tb_frame.f_globals.get("__name__", "")) if tb is not None else ""
    origin = module.split(".")[0] or "?"
    text = f": {err}" if str(err) else ""
    if origin == "leanstream":
        hint = "an unexpected error: please report it with the output of --verbose"
        return f"{command}: {type(err).__name__} in {module}{text} ({hint})"
    hint = "" if verbose else " (--verbose shows the traceback)"
    return f"{command}: {type(err).__name__} in {origin}{text}{hint}"


def _as_flags(message: str, parser: argparse.ArgumentParser) -> str:
    """``message`` with the keyword arguments it suggests (``pass subfolder='unet'``)
    written as the command's options (``pass --subfolder unet``), where it has them."""
    flags = {o for action in parser._actions for o in action.option_strings}

    def flag(match: re.Match[str]) -> str:
        option = "--" + match["name"].replace("_", "-")
        if option not in flags:
            return match[0]
        value = match["quoted"] if match["quoted"] is not None else match["other"] or ""
        return f"{option} {value}".rstrip()

    keyword = r"(?<![\w.-])(?P<name>[a-z][a-z_]*)=(?:'(?P<quoted>[^']*)'|(?P<other>[\w.]+))?"
    return re.sub(keyword, flag, message)


def _fail(message: str) -> int:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    return 1


class _DropMessage(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


@contextlib.contextmanager
def _quiet_libraries(*, enabled: bool) -> Iterator[None]:
    """Drop :data:`QUIET_BY_DEFAULT`'s and :data:`QUIET_WARNINGS`' messages while a command
    runs (filters on those loggers, created here if their library is not imported yet, and
    on warnings); they are removed on return, so ``main()`` called from Python leaves
    logging and warnings as it found them."""
    filters = [
        (logging.getLogger(name), _DropMessage(start))
        for name, start in QUIET_BY_DEFAULT.items()
        if enabled
    ]
    for logger, drop in filters:
        logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            for module, start in QUIET_WARNINGS.items() if enabled else ():
                warnings.filterwarnings("ignore", re.escape(start), module=re.escape(module))
            warnings.showwarning = _show_warning(warnings.showwarning)
            yield
    finally:
        for logger, drop in filters:
            logger.removeFilter(drop)


def _show_warning(show: Any) -> Any:
    """``warnings.showwarning`` that prints leanstream's own warnings (a tokenizer file not
    copied, a broken ``generation_config.json``) as one ``leanstream: warning:`` line, and
    the other libraries' through ``show``."""
    package = os.path.dirname(os.path.abspath(__file__))

    def showwarning(message: Any, category: Any, filename: str, *args: Any, **kw: Any) -> None:
        if os.path.abspath(filename).startswith(package + os.sep):
            print(f"{PROG}: warning: {' '.join(str(message).split())}", file=sys.stderr)
        else:
            show(message, category, filename, *args, **kw)

    return showwarning


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Stream safetensors checkpoints (transformers models, diffusers "
        "components) into bitsandbytes-quantized models.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _verbose_argument(parser, default=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = commands.add_parser(
        "inspect",
        help="describe a checkpoint and predict its memory at 16/8/4 bits (loads no weights)",
        description="Shards, tensor count, dtypes, parameter count, and the memory the "
        "model would take at 16, 8 and 4 bits (nf4, with and without double quantization), "
        "computed from the checkpoint index and the model built on 'meta': no weights loaded. "
        "A diffusers component is predicted by diffusers' rules (every linear layer "
        "quantized but _keep_in_fp32_modules).",
    )
    _source_arguments(inspect)
    inspect.add_argument("--json", action="store_true", help="print a JSON object instead")
    _cpu_kernel_argument(inspect)
    _plan_arguments(inspect)
    inspect.set_defaults(run=_inspect, command_parser=inspect)

    quantize = commands.add_parser(
        "quantize",
        help="stream-quantize a checkpoint and save it pre-quantized",
        description="Load SOURCE quantized, tensor by tensor, and save it to OUT as a "
        "pre-quantized bitsandbytes checkpoint that transformers (diffusers, for a diffusers "
        "component) and leanstream load; with quantized MoE experts (a MoE model at 4 or 8 "
        "bits), --quantize-embeddings or --quantize-lm-head, in leanstream's format, which "
        "only leanstream loads (transformers refuses it, naming leanstream.load). OUT is "
        "replaced atomically.",
    )
    _source_arguments(quantize)
    quantize.add_argument("out", metavar="OUT", help="folder to write")
    quantize.add_argument("--bits", type=int, choices=[4, 8], default=4, help="default: 4")
    _quant_arguments(quantize)
    quantize.add_argument(
        "--max-shard-size",
        type=_size_argument,
        default="4GB",
        help="largest shard, e.g. 4GB (default; decimal units as transformers'), 500MB, 2GiB",
        metavar="SIZE",
    )
    _keep_download_argument(quantize)
    quantize.set_defaults(run=_quantize, command_parser=quantize)

    generate = commands.add_parser(
        "generate",
        help="load a model (quantized) and generate text from a prompt",
        description="Load SOURCE (a transformers model) and generate greedily from PROMPT "
        "with the tokenizer stored in the checkpoint folder.",
    )
    _source_arguments(generate)
    generate.add_argument("--prompt", required=True, help="the text to continue")
    generate.add_argument(
        "--bits",
        choices=["auto", "4", "8", "16"],
        default="auto",
        help="auto (default): 4, or what a pre-quantized checkpoint stores",
    )
    _quant_arguments(generate)
    _cpu_kernel_argument(generate)
    generate.add_argument(
        "--max-new-tokens", type=_positive, default=32, help="default: 32", metavar="N"
    )
    _keep_download_argument(generate)
    generate.set_defaults(run=_generate, command_parser=generate)
    return parser


def _verbose_argument(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default,
        help="print tracebacks and bitsandbytes' warnings",
    )


def _source_arguments(parser: argparse.ArgumentParser) -> None:
    # before or after the command; a command's default must not undo 'leanstream -v CMD'
    _verbose_argument(parser, default=argparse.SUPPRESS)
    parser.add_argument("source", metavar="SOURCE", help="local folder or hub repo id")
    parser.add_argument(
        "--subfolder",
        metavar="DIR",
        help="the model's folder inside SOURCE, e.g. a diffusers pipeline's transformer or unet",
    )
    parser.add_argument(
        "--variant",
        help="weights variant, e.g. fp16 (*.fp16.safetensors); needed when there are several",
    )
    parser.add_argument(
        "--model-class",
        metavar="NAME",
        help="transformers class to build: AutoModel, AutoModelForSeq2SeqLM, BertModel... "
        "(default: the class the config's architectures names, else its causal LM class; "
        "a diffusers component is the class its config names)",
    )
    parser.add_argument("--revision", help="hub revision (branch, tag or commit)")
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow custom modeling code"
    )
    parser.add_argument(
        "--dtype",
        choices=["auto", *_DTYPES],
        default="auto",
        help="dtype of unquantized tensors (default: the checkpoint's)",
    )


def _quant_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quant-type", choices=["nf4", "fp4"], default="nf4")
    parser.add_argument("--double-quant", action="store_true", help="quantize 4-bit absmax too")
    parser.add_argument("--compute-dtype", choices=_DTYPES, help="default: the model's dtype")
    parser.add_argument(
        "--quantize-embeddings",
        action="store_true",
        help="quantize nn.Embedding modules too (a folder only leanstream loads)",
    )
    parser.add_argument(
        "--quantize-lm-head",
        action="store_true",
        help="quantize lm_head too (a folder only leanstream loads)",
    )
    parser.add_argument(  # one value per use: nargs="+" would take SOURCE and OUT too
        "--skip-modules",
        action="extend",
        type=_module_names,
        metavar="NAME[,NAME...]",
        help="modules kept in full precision (comma-separated, or the option repeated)",
    )
    parser.add_argument("--device", help="cuda, cuda:1, cpu... (default: cuda if available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _cpu_kernel_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cpu-kernel",
        choices=["auto", "plain"],
        default="auto",
        help="4-bit layers on the CPU: auto (default) uses bitsandbytes' AVX512-BF16 kernel "
        "where it detects it, with weights laid out for it at load; plain: its plain kernel",
    )


def _plan_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "device_map plan",
        "Also print where each module would go, and the bytes planned per device: the plan "
        "leanstream.load(SOURCE, bits=..., device_map=..., max_memory=...) makes (accelerate's "
        "planner on the quantized meta model, each tensor at its loaded size), for one "
        "setting. Planning needs no GPU: the devices of --max-memory need not be present.",
    )
    group.add_argument(
        "--device-map", choices=_STRATEGIES, help="the strategy, as transformers names them"
    )
    group.add_argument(
        "--max-memory",
        type=_max_memory_argument,
        metavar="DEVICE=SIZE,...",
        help="budget per device, e.g. 0=22GiB,1=22GiB,cpu=48GiB (devices 0, 1, ... or cuda:N, "
        "and cpu; sizes in bytes or as accelerate reads them: 22GiB, 500MiB, 22GB); "
        "default: what accelerate finds free on this machine",
    )
    group.add_argument(
        "--bits",
        choices=["4", "8", "16"],
        help="the setting planned (default: 4, or what a pre-quantized checkpoint stores)",
    )
    group.add_argument("--quant-type", choices=["nf4", "fp4"], help="4-bit type (default: nf4)")
    group.add_argument("--double-quant", action="store_true", help="quantize 4-bit absmax too")


#: a device of ``--max-memory``: a CUDA index (``0``, ``cuda:0``), ``cpu``, or ``disk``,
#: which the planner refuses with the error ``load`` gives
_BUDGET_DEVICE = re.compile(r"(?:cuda:)?(\d+)|cpu|disk")


def _max_memory_argument(text: str) -> dict[int | str, int | str]:
    """``--max-memory 0=22GiB,1=22GiB,cpu=48GiB``: ``load``'s ``max_memory`` (sizes as
    given, which accelerate reads; plain digits are bytes)."""
    from accelerate.utils import convert_file_size_to_int

    budget: dict[int | str, int | str] = {}
    for item in text.split(","):
        device, equals, size = (part.strip() for part in item.partition("="))
        match = _BUDGET_DEVICE.fullmatch(device)
        if not equals or match is None or not size:
            raise argparse.ArgumentTypeError(
                f"{item!r}: expected DEVICE=SIZE, DEVICE being 0, 1, ... (or cuda:N), cpu, "
                "e.g. 0=22GiB,1=22GiB,cpu=48GiB"
            )
        value: int | str = int(size) if size.isdigit() else size
        try:
            convert_file_size_to_int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{item!r}: invalid size {size!r} (bytes, or e.g. 22GiB, 500MiB, 22GB)"
            ) from None
        key: int | str = int(match.group(1)) if match.group(1) is not None else device
        if key in budget:
            raise argparse.ArgumentTypeError(f"{item!r}: device {device} given twice")
        budget[key] = value
    return budget


def _size_argument(text: str) -> int:
    from .save import parse_size

    try:
        return parse_size(text)
    except ConfigError:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r} (bytes, or e.g. 4GB, 500MB)"
        ) from None


def _module_names(text: str) -> list[str]:
    """``--skip-modules lm_head,model.layers.0.mlp``: the names, in order."""
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"empty module name in {text!r}")
    return names


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


#: options that only mean something for 4-bit, and for 4 or 8 bits (as load's
#: ``options.check`` and its embeddings / lm_head flags refuse them otherwise)
_FOUR_BIT_FLAGS = ("--quant-type", "--double-quant", "--compute-dtype")
_QUANT_FLAGS = (*_FOUR_BIT_FLAGS, "--quantize-embeddings", "--quantize-lm-head", "--skip-modules")


def _conflict(args: argparse.Namespace) -> str | None:
    """What is wrong with a combination of options that cannot work, whatever the
    checkpoint (a usage error, found before anything is read); None if nothing is.
    :func:`leanstream.load` and :func:`inspect_checkpoint` refuse the same with a
    :class:`ConfigError`: this says it in the command line's words."""
    if args.command == "inspect" and args.device_map is None:
        if args.max_memory is not None:
            return "--max-memory needs --device-map (it is the budget of that plan)"
        given = ["--bits"] if args.bits is not None else []
        given += _given(args, ("--quant-type", "--double-quant"))
        if given:
            return (
                f"{', '.join(given)}: chooses the setting --device-map plans; without "
                "--device-map inspect predicts every setting"
            )
    bits = str(getattr(args, "bits", None))  # generate's and inspect's are text
    if bits == "8":
        given = _given(args, _FOUR_BIT_FLAGS)
        if given:
            return f"{', '.join(given)}: a 4-bit option, but --bits 8"
    if bits == "16":
        given = _given(args, _QUANT_FLAGS)
        if given:
            return f"{', '.join(given)}: a quantization option, but --bits 16 quantizes nothing"
    return None


def _given(args: argparse.Namespace, flags: Sequence[str]) -> list[str]:
    """Those of ``flags`` (of this command) given a value other than load's default."""
    defaults = {"quant_type": "nf4"}
    given = []
    for flag in flags:
        key = flag.removeprefix("--").replace("-", "_")
        value = getattr(args, key, None)
        if value and value != defaults.get(key):
            given.append(flag)
    return given


# --- inspect ------------------------------------------------------------------------


@dataclass
class Prediction:
    """Predicted bytes of a loaded model (what :func:`leanstream.footprint` would report)."""

    setting: str
    total_bytes: int
    by_kind: dict[str, int] = field(default_factory=dict)


def _inspect(args: argparse.Namespace) -> int:
    report = inspect_checkpoint(
        args.source,
        revision=args.revision,
        trust_remote_code=args.trust_remote_code,
        dtype=args.dtype,
        subfolder=args.subfolder,
        variant=args.variant,
        model_class=_model_class(args.model_class),
        device_map=args.device_map,
        max_memory=args.max_memory,
        bits=int(args.bits) if args.bits is not None else None,
        quant_type=args.quant_type,
        double_quant=args.double_quant,
        cpu_kernel=args.cpu_kernel,
    )
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"source       {report['folder']}")
    library = report["model_type"] or "diffusers"
    print(f"model        {report['architecture']} ({library}), dtype {report['dtype']}")
    if report["quantization"]:
        print(f"quantized    {report['quantization']} (pre-quantized checkpoint)")
    print(f"shards       {len(report['shards'])} file(s), {format_bytes(report['tensor_bytes'])}")
    dtypes = ", ".join(
        f"{d} {v['count']} ({format_bytes(v['bytes'])})" for d, v in report["dtypes"].items()
    )
    print(f"tensors      {report['tensors']}: {dtypes}")
    print(f"parameters   {report['parameters']:,}")
    layers = report["quantizable_layers"]
    kept = report["kept_in_full_precision"]
    print(
        f"layers       {layers} linear layer(s) quantized at 8/4 bits; "
        f"kept: {', '.join(kept) or 'none'}"
    )
    by_reason: dict[str, list[str]] = {}
    for name, why in report["notes"].items():
        by_reason.setdefault(why, []).append(name)
    for why, names in by_reason.items():
        print(f"{'':<13}{', '.join(_condense_numbered(names))}: {why}")
    rows = [("setting", "total", "by kind")] + [
        (
            row["setting"],
            format_bytes(row["total_bytes"]),
            ", ".join(f"{k} {format_bytes(v)}" for k, v in sorted(row["by_kind"].items())),
        )
        for row in report["memory"]
    ]
    width = max(len(setting) for setting, _, _ in rows)
    total_width = max(len(total) for _, total, _ in rows)
    for i, (setting, total, kinds) in enumerate(rows):
        print(f"{'' if i else 'memory':<13}{setting:<{width}}  {total:>{total_width}}  {kinds}")
    if report["cpu_layout"]:
        print(
            f"{'':<13}4-bit linears in bitsandbytes' AVX512-BF16 CPU layout (this CPU): "
            "absmax bfloat16, never double-quantized (--cpu-kernel plain: the plain one)"
        )
    if report["device_map"] is not None:
        _print_plan(report)
    return 0


def _print_plan(report: dict[str, Any]) -> None:
    """The plan, one line per run of modules on one device (numbered siblings condensed:
    ``model.layers.0-39``), then the bytes planned on each device against its budget."""
    budget = report["max_memory"]
    asked = ", ".join(f"{k}={v}" for k, v in budget.items()) if budget else "(what is free)"
    print(
        f"plan         {report['planned_setting']}, device_map {report['strategy']}, "
        f"max_memory {asked}"
    )
    runs: list[tuple[Any, list[str]]] = []
    for name, device in report["device_map"].items():
        if runs and runs[-1][0] == device:
            runs[-1][1].append(name)
        else:
            runs.append((device, [name]))
    for device, names in runs:
        print(f"{'':<13}{', '.join(_condense(names))} -> {_device_label(device)}")
    used = report["per_device"]  # keys as max_memory's: "0", "1", "cpu"
    labels = {d: _device_label(int(d) if d.isdigit() else d) for d in used}
    sizes = {d: format_bytes(n) for d, n in used.items()}
    width = max(map(len, labels.values()))
    size_width = max(map(len, sizes.values()))
    for i, device in enumerate(used):
        of = f" of {budget[device]}" if budget and device in budget else ""
        head = "" if i else "per device"
        print(f"{head:<13}{labels[device]:<{width}}  {sizes[device]:>{size_width}}{of}")


def _device_label(device: Any) -> str:
    """A device_map entry as torch names the device: 0 -> cuda:0."""
    return f"cuda:{device}" if isinstance(device, int) else str(device)


def _condense(names: list[str]) -> list[str]:
    """``names`` with each run of consecutive numbered siblings written as one:
    ``model.layers.0``, ..., ``model.layers.39`` -> ``model.layers.0-39``."""
    runs: list[list[Any]] = []  # [name], or [parent, first, last]
    for name in names:
        parent, _, last = name.rpartition(".")
        run = runs[-1] if runs else []
        if last.isdigit() and len(run) == 3 and run[0] == parent and run[2] + 1 == int(last):
            run[2] += 1
        elif last.isdigit() and parent:
            runs.append([parent, int(last), int(last)])
        else:
            runs.append([name or "(the whole model)"])
    return [
        run[0]
        if len(run) == 1
        else f"{run[0]}.{run[1]}" + (f"-{run[2]}" if run[2] > run[1] else "")
        for run in runs
    ]


def _condense_numbered(names: list[str]) -> list[str]:
    """``names`` that differ only by one number written as one, the numbers as runs:
    ``model.layers.0.mlp.gate`` ... ``model.layers.39.mlp.gate`` ->
    ``model.layers.0-39.mlp.gate``."""
    groups: dict[str, list[int]] = {}
    single: list[str] = []
    for name in names:
        numbers = re.findall(r"(?:^|\.)(\d+)(?=\.|$)", name)
        if len(numbers) != 1:
            single.append(name)
            continue
        template = re.sub(r"(^|\.)\d+(?=\.|$)", r"\1{}", name)
        groups.setdefault(template, []).append(int(numbers[0]))
    out = []
    for template, numbers in groups.items():
        runs: list[list[int]] = []
        for n in sorted(numbers):
            if runs and runs[-1][1] + 1 == n:
                runs[-1][1] = n
            else:
                runs.append([n, n])
        text = ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)
        out.append(template.format(text))
    return out + single


def inspect_checkpoint(
    source: str | os.PathLike[str],
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    dtype: str = "auto",
    subfolder: str | None = None,
    variant: str | None = None,
    model_class: Any = None,
    device_map: str | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    bits: int | None = None,
    quant_type: str | None = None,
    double_quant: bool = False,
    cpu_kernel: str = "auto",
) -> dict[str, Any]:
    """What ``leanstream inspect`` prints, as a dict (JSON-serializable).

    Reads the checkpoint index (headers only) and builds the model on ``meta``; the
    predicted memory is exactly what :func:`leanstream.footprint` reports after
    :func:`leanstream.load` with those settings (blocksize 64 for 4 bits) and
    ``cpu_kernel``, on the default device: a GPU when there is one, else this CPU,
    where bitsandbytes' AVX512-BF16 layout changes 4-bit statistics (``"cpu_layout"``
    says whether it does).
    ``subfolder``, ``variant`` and ``model_class`` are :func:`leanstream.load`'s: the
    same weights are opened, the same model is built (a diffusers component as the
    class its ``config.json`` names, predicted by diffusers' rules), and what ``load``
    refuses is refused.

    With ``device_map`` (a strategy: ``"auto"``, ``"balanced"``, ``"balanced_low_0"``,
    ``"sequential"``) and ``max_memory``, also the plan :func:`leanstream.load` makes
    with those and ``bits`` / ``quant_type`` / ``double_quant`` (default: 4-bit nf4, or
    what a pre-quantized checkpoint stores): ``"device_map"`` (module name -> CUDA index
    or ``"cpu"``), ``"per_device"`` (planned bytes by device, ``"0"``, ``"1"``, ...,
    ``"cpu"``; they add up to the memory predicted for ``"planned_setting"``),
    ``"strategy"`` and ``"max_memory"`` as asked (all None without ``device_map``). A plan
    that does not fit is ``load``'s ConfigError. The GPUs of ``max_memory`` need not be
    present: planning needs none.

    ``"kept_in_full_precision"`` lists the linears no setting quantizes, and ``"notes"``
    (``{name: why}``) the linears leanstream's rules beyond the library's decided
    (:mod:`leanstream.layers`): an ``nn.Linear`` subclass with a forward of its own,
    kept; one that is a plain linear, quantized; a weight a forward reads directly, kept;
    MoE experts weights no load quantizes (used whole, or held as 2-D tensors), kept.
    """
    from . import _core
    from .families import family, fp32_rule
    from .loader import _model_dtype
    from .matching import Names, expected_shapes, plan_targets, rename_keys
    from .meta import build_diffusers_model, build_empty_model
    from .prequantized import describe, quantization_dict

    if device_map is None and max_memory is not None:
        raise ConfigError("max_memory applies with device_map='auto' (or another plan)")
    if device_map is None and (bits is not None or quant_type is not None or double_quant):
        raise ConfigError(
            "bits, quant_type and double_quant choose the setting a device_map plans: without "
            "device_map inspect predicts every setting"
        )
    folder, weights, download, config, diffusers_class = _open_as_load(
        source, subfolder, variant, revision, trust_remote_code, model_class
    )
    quant = quantization_dict(config)
    arrivals = download.arrivals if download is not None else None
    with download or contextlib.nullcontext(), _core.Checkpoint(weights, arrivals=arrivals) as ckpt:
        model_dtype = _model_dtype(dtype, config, ckpt)
        dtypes: dict[str, dict[str, int]] = {}
        for key in ckpt.keys():
            info = ckpt[key]
            entry = dtypes.setdefault(info.dtype, {"count": 0, "bytes": 0})
            entry["count"] += 1
            entry["bytes"] += info.nbytes
        shards = [Path(f).name for f in ckpt.files]
        tensors, tensor_bytes = len(ckpt), ckpt.total_bytes
        if diffusers_class is not None:
            model = build_diffusers_model(diffusers_class, folder)
        else:
            model = build_empty_model(
                config, trust_remote_code=trust_remote_code, model_class=model_class
            )
        parameters = sum(p.numel() for p in model.parameters())
        linears = sorted(name for name, module in model.named_modules() if _is_linear(module))
        expected = expected_shapes(model)
        # what load() refuses (conversions that cannot be streamed), inspect refuses too
        renamed = rename_keys(model, ckpt, folder, expected)
        keep_fp32 = fp32_rule(model, family(model), model_dtype)
        settings, layers, pre, notes = _choose_layers(
            model, config, folder, expected, set(renamed[0]), keep_fp32
        )
        planned = None
        if device_map is not None:  # the setting to plan, refused as load refuses it
            planned = _planned_setting(
                config, folder, settings, pre, bits, quant_type, double_quant
            )
            settings.setdefault(*planned)  # predicted too (4-bit fp4 is not by default)
        # and missing, unexpected or mis-shaped tensors
        stored = dict.fromkeys(layers.embeddings if pre is not None else (), False)
        replaced = {**layers.replaced, **stored}
        plan_targets(
            model,
            ckpt,
            folder,
            expected,
            replaced,
            model_dtype,
            keep_fp32,
            renamed,
            set(),
            Names(),
            pre,
        )
    # a plan is sized in the plain layout, which every device starts from: its memory too
    on_cpu_layout = _cpu_layout_applies(cpu_kernel) and device_map is None
    predictions, quantized = _predict(model, model_dtype, settings, layers, on_cpu_layout)
    plan: dict[str, Any] = dict.fromkeys(
        ("planned_setting", "strategy", "max_memory", "device_map", "per_device")
    )
    if planned is not None and device_map is not None:
        from . import placement

        label, spec = planned
        sizes = _planned_sizes(model, spec, layers, pre, model_dtype)
        chosen = placement.plan(model, sizes, device_map, max_memory)
        used = placement.per_device(chosen, sizes)
        order = sorted(used, key=lambda d: (not isinstance(d, int), str(d)))  # GPUs, then cpu
        budget = {str(k).removeprefix("cuda:"): v for k, v in (max_memory or {}).items()}
        plan = {
            "planned_setting": label,
            "strategy": device_map,
            "max_memory": budget or None,  # keyed as per_device: "0", "1", "cpu"
            "device_map": chosen,
            "per_device": {str(d): used[d] for d in order},
        }
    return {
        "folder": str(folder),
        "architecture": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "class_name": diffusers_class.__name__ if diffusers_class is not None else None,
        "dtype": str(model_dtype).removeprefix("torch."),
        "quantization": None if quant is None else describe(quant, str(folder / "config.json")),
        "shards": shards,
        "tensors": tensors,
        "tensor_bytes": tensor_bytes,
        "dtypes": dtypes,
        "parameters": parameters,
        "quantizable_layers": quantized,
        "kept_in_full_precision": [name for name in linears if name not in layers.replaced],
        "notes": notes,
        "memory": [asdict(p) for p in predictions],
        "cpu_layout": on_cpu_layout,
        **plan,
    }


def _cpu_layout_applies(cpu_kernel: str) -> bool:
    """Whether :func:`leanstream.load` on the default device, with ``cpu_kernel``, puts
    4-bit linears in bitsandbytes' AVX512-BF16 CPU layout."""
    import torch

    from . import cpu_layout

    if cpu_kernel not in ("auto", "plain"):
        raise ConfigError(f"cpu_kernel must be 'auto' or 'plain', got {cpu_kernel!r}")
    return (
        cpu_kernel == "auto"
        and not torch.cuda.is_available()
        and cpu_layout.detected()
        and cpu_layout.agrees()
    )


def _planned_setting(
    config: Any,
    folder: Path,
    settings: dict[str, Any],
    pre: Any,
    bits: int | None,
    quant_type: str | None,
    double_quant: bool,
) -> tuple[str, Any]:
    """The (name, :class:`~leanstream.quantize.QuantSpec`) a device_map is planned for:
    ``bits`` / ``quant_type`` / ``double_quant`` as :func:`leanstream.load` takes them
    (``bits=16``: none), checked as it checks them; a pre-quantized checkpoint's own
    setting, which they may only repeat."""
    from .options import DEFAULTS, check
    from .prequantized import Prequantized
    from .quantize import QuantSpec

    asked = {**DEFAULTS, "quant_type": quant_type or DEFAULTS["quant_type"]}
    asked["double_quant"] = double_quant
    spec = QuantSpec(bits=bits or 4, quant_type=asked["quant_type"], double_quant=double_quant)
    if pre is None:
        check(asked, spec.bits)
        label = "16-bit" if spec.bits == 16 else _setting_name(spec.bits, spec)
        return label, spec
    Prequantized.from_config(  # refuses bits / quant_type / double_quant the checkpoint lacks
        config,
        folder,
        bits="auto" if bits is None else None if bits == 16 else bits,
        requested=spec,
        skip_modules=None,
        compute_dtype_given=False,
    )
    ((label, spec),) = settings.items()  # its only setting
    return label, spec


def _planned_sizes(
    model: Any, spec: Any, layers: _Layers, pre: Any, model_dtype: Any
) -> dict[str, int]:
    """:func:`leanstream.placement.tensor_sizes` of ``model`` as :func:`leanstream.load`
    plans it for ``spec``: its linears as :func:`_choose_layers` replaced them (the
    loader's skip rules; the sizes follow ``spec``, not the layer class), and the
    embeddings a pre-quantized checkpoint stores quantized replaced as the loader does
    (after :func:`_predict`, which reads them as built)."""
    from .placement import tensor_sizes
    from .quantize import replace_embeddings

    if pre is not None and layers.embeddings:
        replace_embeddings(model, spec, layers.embeddings, model_dtype)

    def dtype_of(module_name: str, attr: str, tensor: Any) -> Any:
        return _loaded_dtype(tensor, module_name, attr, model_dtype, layers)

    return tensor_sizes(model, spec, dtype_of, layers.experts if spec.quantized else {})


def _open_as_load(
    source: str | os.PathLike[str],
    subfolder: str | None,
    variant: str | None,
    revision: str | None,
    trust_remote_code: bool,
    model_class: Any,
) -> tuple[Path, Path | list[Path], Any, Any, type | None]:
    """:func:`leanstream.load`'s first steps, in its order, with its errors: the folder,
    the weights to open, the download of a hub repo's shard headers (None when the
    weights are on disk; a context manager to close), the config (transformers', or the
    loader's view of a diffusers one) and the diffusers class (None for a transformers
    model). From the hub only the shards' headers are fetched: nothing reads a tensor."""
    from .checkpoint import load_config, read_config_dict
    from .download import locate
    from .loader import _diffusers_class, _refuse_pipeline_folder, _SavedConfig

    folder, weights, download = locate(
        source, subfolder=subfolder, revision=revision, variant=variant, headers_only=True
    )
    try:
        _refuse_pipeline_folder(folder)
        config_dict = read_config_dict(folder)
        diffusers_class = _diffusers_class(folder, config_dict)
        if diffusers_class is None:
            config = load_config(folder, trust_remote_code=trust_remote_code)
            return folder, weights, download, config, None
        if model_class is not None:
            raise ConfigError(
                f"model_class={model_class!r}: {folder / 'config.json'} is a diffusers "
                f"config, built as the class it names ({diffusers_class.__name__})"
            )
        return folder, weights, download, _SavedConfig(config_dict), diffusers_class
    except BaseException:
        if download is not None:
            download.close()
        raise


@dataclass(frozen=True)
class _Layers:
    """What a load does to each tensor of the model, as the loader decides it: the
    linears it quantizes (``{name: transpose}``), the embeddings and output embeddings
    it quantizes with the flags (or that a pre-quantized checkpoint stores quantized),
    ``{name: (E, R, C)}`` of the 3-D experts weights it quantizes, the tensors it reads
    from the checkpoint and ``keep_fp32(module_name, attr)``, its float32 rule."""

    replaced: dict[str, bool]
    embeddings: set[str]
    output: set[str]
    experts: dict[str, tuple[int, ...]]
    loaded: set[str]
    keep_fp32: Any


def _choose_layers(
    model: Any,
    config: Any,
    folder: Path,
    expected: dict[str, tuple[int, ...]],
    loaded: set[str],
    keep_fp32: Any,
) -> tuple[dict[str, Any], _Layers, Any, dict[str, str]]:
    """The settings to predict, what each does to the layers (the loader's own plan,
    :func:`leanstream.layers.plan_layers`; ``model``'s linears are replaced, on meta),
    the :class:`~leanstream.prequantized.Prequantized` of a pre-quantized checkpoint
    (None otherwise) and the plan's notes on layers the rules beyond the library
    decided."""
    from .layers import plan_layers
    from .prequantized import Prequantized
    from .quantize import QuantSpec, replace_linears

    pre = None
    if getattr(config, "quantization_config", None) is not None:
        pre = Prequantized.from_config(
            config,
            folder,
            bits="auto",
            requested=QuantSpec(),
            skip_modules=None,
            compute_dtype_given=False,
        )
        plan = plan_layers(model, pre.spec, expected, prequantized=pre)
        spec = dataclasses.replace(
            pre.spec, embeddings=bool(plan.embeddings), lm_head=bool(plan.output)
        )
        settings = {_setting_name(pre.spec.bits, spec): spec}
    else:  # the flags' embeddings and output embeddings too, for the settings with them
        plan = plan_layers(model, QuantSpec(bits=4, embeddings=True, lm_head=True), expected)
        settings = _standard_settings(extra=bool(plan.embeddings or plan.output))
        plan.skip |= plan.output  # kept, but in the settings with the flags
    replaced = replace_linears(model, pre.spec if pre is not None else QuantSpec(bits=4), plan.skip)
    layers = _Layers(replaced, plan.embeddings, plan.output, plan.experts, loaded, keep_fp32)
    return settings, layers, pre, plan.notes


def _standard_settings(*, extra: bool = True) -> dict[str, Any]:
    """The settings inspect predicts; ``extra``: with those that quantize embeddings
    and the output embeddings too (left out for a model that has neither)."""
    from .quantize import QuantSpec

    settings = {
        "16-bit": QuantSpec(bits=16),
        "8-bit (LLM.int8)": QuantSpec(bits=8),
        "4-bit nf4": QuantSpec(bits=4),
        "4-bit nf4 + double": QuantSpec(bits=4, double_quant=True),
    }
    if extra:  # quantize_embeddings=True, quantize_lm_head=True
        settings["8-bit + emb/head"] = QuantSpec(bits=8, embeddings=True, lm_head=True)
        settings["4-bit nf4 + emb/head"] = QuantSpec(bits=4, embeddings=True, lm_head=True)
        settings["4-bit nf4 + double + emb/head"] = QuantSpec(
            bits=4, double_quant=True, embeddings=True, lm_head=True
        )
    return settings


def _setting_name(bits: int, spec: Any) -> str:
    extra = " + emb/head" if spec.embeddings or spec.lm_head else ""
    if bits == 8:
        return "8-bit (LLM.int8)" if not extra else "8-bit" + extra
    return f"4-bit {spec.quant_type}" + (" + double" if spec.double_quant else "") + extra


def _predict(
    model: Any,
    model_dtype: Any,
    settings: dict[str, Any],
    layers: _Layers,
    cpu_layout: bool = False,
) -> tuple[list[Prediction], int]:
    """Bytes of parameters and buffers after loading with each setting, by
    :func:`leanstream.footprint`'s kinds (``model``: on meta, its linears replaced),
    and the number of weights quantized at 8/4 bits (a shared one counted once).
    ``cpu_layout``: a load on this CPU puts 4-bit linears in bitsandbytes' AVX512-BF16
    layout (:mod:`leanstream.cpu_layout`), whose statistics differ."""
    from .placement import weight_bytes

    # (out_features, in_features, a linear: takes the CPU layout) of every weight that
    # gets quantized
    shapes: list[tuple[int, int, bool]] = []
    extra = []  # the same for embeddings / lm_head, quantized only with the flags
    plain: dict[str, int] = {}  # bytes of the tensors no setting changes, by kind
    extra_plain: dict[str, int] = {}  # bytes of those embeddings / lm_head unquantized
    flagged = layers.embeddings | layers.output
    buffers: set[int] = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for name, param in module.named_parameters(recurse=False):
            if _is_shared(model, prefix + name):
                continue
            if name == "weight" and module_name in layers.replaced:
                shapes.append((int(module.out_features), int(module.in_features), True))
                continue
            if prefix + name in layers.experts:
                count, rows, cols = layers.experts[prefix + name]
                shapes.append((count * rows, cols, False))
                continue
            dtype = _loaded_dtype(param, module_name, name, model_dtype, layers)
            if name == "weight" and module_name in flagged:
                out_features, in_features = (int(d) for d in param.shape)
                extra.append((out_features, in_features, module_name in layers.output))
                _add(extra_plain, _kind(dtype), param.numel() * dtype.itemsize)
                continue
            _add(plain, _kind(dtype), param.numel() * dtype.itemsize)
        for name, buf in module.named_buffers(recurse=False):
            if id(buf) in buffers:
                continue
            buffers.add(id(buf))
            # loaded from the checkpoint: in the dtype load gives; else as built
            dtype = buf.dtype
            if prefix + name in layers.loaded:
                dtype = _loaded_dtype(buf, module_name, name, model_dtype, layers)
            _add(plain, _kind(dtype), buf.numel() * dtype.itemsize)
    predictions = []
    for label, spec in settings.items():
        by_kind = dict(plain)
        quantized = list(shapes)
        if spec.embeddings or spec.lm_head:
            quantized += extra
        else:
            for kind, nbytes in extra_plain.items():
                _add(by_kind, kind, nbytes)
        for out_features, in_features, linear in quantized:
            if spec.bits == 16:
                n = out_features * in_features
                _add(by_kind, _kind(model_dtype), n * model_dtype.itemsize)
                continue
            packed = cpu_layout and linear and spec.cpu_kernel == "auto"
            sizes = weight_bytes(out_features, in_features, spec, cpu_layout=packed)
            for kind, nbytes in sizes.items():
                _add(by_kind, kind, nbytes)
        predictions.append(Prediction(label, sum(by_kind.values()), by_kind))
    return predictions, len(shapes)


def _loaded_dtype(
    tensor: Any, module_name: str, attr: str, model_dtype: Any, layers: _Layers
) -> Any:
    """The dtype a full-precision tensor has after load: float32 by the library's
    float32 rule, else the model's dtype; integer tensors as they are."""
    import torch

    if not tensor.is_floating_point():
        return tensor.dtype
    return torch.float32 if layers.keep_fp32(module_name, attr) else model_dtype


def _is_linear(module: Any) -> bool:
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, nn.Linear | Conv1D)


def _is_shared(model: Any, name: str) -> bool:
    """A tied weight's second name (counted once, as the loaded model shares it)."""
    return name in (getattr(model, "all_tied_weights_keys", None) or {})


def _kind(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _add(table: dict[str, int], kind: str, nbytes: int) -> None:
    table[kind] = table.get(kind, 0) + nbytes


# --- quantize and generate ------------------------------------------------------------


def _load_options(args: argparse.Namespace, bits: int | str | None) -> dict[str, Any]:
    return dict(
        bits=bits,
        quant_type=args.quant_type,
        double_quant=args.double_quant,
        compute_dtype=args.compute_dtype,
        quantize_embeddings=args.quantize_embeddings,
        quantize_lm_head=args.quantize_lm_head,
        skip_modules=args.skip_modules,
        dtype=args.dtype,
        device=args.device,
        revision=args.revision,
        trust_remote_code=args.trust_remote_code,
        progress=not args.no_progress,
        subfolder=args.subfolder,
        variant=args.variant,
        model_class=_model_class(args.model_class),
    )


def _model_class(name: str | None) -> Any:
    """``--model-class NAME``: the transformers class of that name."""
    if name is None:
        return None
    import transformers

    found = getattr(transformers, name, None) if name.isidentifier() else None
    if not isinstance(found, type):
        raise ConfigError(
            f"--model-class {name}: transformers {transformers.__version__} has no such class "
            "(a model class such as BertModel, or an Auto class such as AutoModel, "
            "AutoModelForSeq2SeqLM)"
        )
    return found


def _located(args: argparse.Namespace) -> tuple[Path, str | Path, dict[str, Any]]:
    """SOURCE's folder (for a hub repo: its configs and tokenizer, fetched; the weights
    are streamed by the load), what to load, and the load's options that say where."""
    from .download import config_folder

    folder, hub = config_folder(args.source, subfolder=args.subfolder, revision=args.revision)
    if hub:
        return folder, args.source, {"keep_download": not args.no_keep_download}
    return folder, folder, {"subfolder": None}  # resolved


def _keep_download_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-keep-download",
        action="store_true",
        help="for a hub repo not in the cache: keep no full-precision shard on disk (each "
        "piece is dropped once quantized; a second load downloads again)",
    )


def _quantize(args: argparse.Namespace) -> int:
    from .footprint import footprint
    from .loader import load
    from .save import leanstream_extras, save

    # OUT as save checks it, before a weight is read (and before a hub download)
    out = Path(args.out).expanduser().absolute()
    _check_out(out, None)
    folder, source, where = _located(args)
    _check_out(out, folder)
    options = {**_load_options(args, args.bits), **where}
    # the plain layout: nothing runs here, and bitsandbytes' CPU layout keeps absmax in
    # bfloat16 only (a saved checkpoint would lose the float32 scales)
    model = load(source, **options, cpu_kernel="plain")
    out = save(model, out, max_shard_size=args.max_shard_size, progress=not args.no_progress)
    shards = sorted(out.glob("*.safetensors"))
    on_disk = sum(shard.stat().st_size for shard in shards)
    print(
        f"wrote {out}: {len(shards)} shard(s), {format_bytes(on_disk)}; "
        f"in memory {format_bytes(footprint(model).total_bytes)}"
    )
    extra = leanstream_extras(getattr(model.config, "quantization_config", None) or {})
    if extra:
        what = [w for w, key in _EXTRAS if extra[key]]
        print(
            f"leanstream format ({' and '.join(what)} quantized): leanstream.load reads it; "
            "transformers' from_pretrained refuses it"
        )
    return 0


#: what a folder in leanstream's format holds quantized, by its config field
_EXTRAS = (
    ("MoE experts", "leanstream_quantized_experts"),
    ("embeddings", "leanstream_quantized_embeddings"),
    ("lm_head", "leanstream_quantized_lm_head"),
)


def _check_out(out: Path, source: Path | None) -> None:
    """What :func:`leanstream.save` refuses of ``out`` that needs no loaded model: a file,
    a path under a file, a non-empty folder that is not a checkpoint and, given
    ``source``, the folder the model is loaded from. save.py's own check, which needs the
    model only for its source folder (``_leanstream_source``, which load records) and for
    the files its tensors are mapped from: here a stand-in that has the first, and no
    tensors (save checks again, with the model)."""
    from types import SimpleNamespace

    from .save import _check_target

    model = SimpleNamespace(_leanstream_source=source) if source is not None else None
    _check_target(out, model)


def _generate(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import read_config_dict
    from .loader import load
    from .save import tokenizer_files

    folder, source, where = _located(args)
    config = read_config_dict(folder)
    if "model_type" not in config:  # a diffusers component
        raise ConfigError(
            f"{folder / 'config.json'}: a diffusers {config['_class_name']}, not a transformers "
            "language model: generate needs one (quantize and inspect take diffusers components)"
        )
    if not tokenizer_files(folder):
        raise ConfigError(
            f"{folder}: no tokenizer files (tokenizer.json, tokenizer_config.json, "
            "tokenizer.model...); generate needs the checkpoint's own tokenizer: copy it into "
            "the folder (leanstream quantize and leanstream.save copy it from their source)"
        )
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as err:
        raise ConfigError(f"{folder}: the tokenizer cannot be loaded: {err}") from err
    bits = None if args.bits == "16" else args.bits if args.bits == "auto" else int(args.bits)
    options = {**_load_options(args, bits), **where}
    model = load(source, **options, cpu_kernel=args.cpu_kernel)
    device = next(model.parameters()).device
    inputs = tokenizer(args.prompt, return_tensors="pt").to(device)
    if inputs["input_ids"].shape[1] == 0:
        raise ConfigError("--prompt: the tokenizer turned it into no tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        output = model.generate(
            **inputs, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=pad
        )
    print(tokenizer.decode(output[0], skip_special_tokens=True))
    return 0


__all__ = ["Prediction", "inspect_checkpoint", "main"]
