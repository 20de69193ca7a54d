"""The ``leanstream`` command line, in-process (``main([...])``) and as ``python -m leanstream``."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from cpu_kernel import like_first_forward, packs
from test_load import assert_same_weights, logits
from transformers import AutoModelForCausalLM, AutoTokenizer

import leanstream
from leanstream.cli import main
from leanstream.progress import format_bytes

# the outcome depends on bitsandbytes' CPU 4-bit kernel (tests/cpu_kernel.py)
pytestmark = pytest.mark.cpu_kernel


PACKAGE_ROOT = str(Path(leanstream.__file__).resolve().parent.parent)


def run(*args: str, path: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m leanstream ARGS`` in a fresh process importing this checkout's package
    (and ``path``'s ``sitecustomize``, if given)."""
    first = [str(path)] if path is not None else []
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([*first, PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-m", "leanstream", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def call(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    """stderr shows exactly one line, ``leanstream: error: ...``, and no traceback (what
    a terminal shows: a progress bar cleared with a carriage return is gone)."""
    lines = [line.rsplit("\r", 1)[-1] for line in err.split("\n")]
    lines = [line for line in lines if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("leanstream: error: "), err
    assert "Traceback" not in err
    return lines[0]


# --- help and usage ----------------------------------------------------------------


def test_help_as_a_process() -> None:
    result = run("--help")
    assert result.returncode == 0, result.stderr
    for command in ("inspect", "quantize", "generate"):
        assert command in result.stdout
    result = run("quantize", "--help")
    assert result.returncode == 0 and "--double-quant" in result.stdout


@pytest.mark.parametrize("command", ["inspect", "quantize", "generate"])
def test_help_of_each_command(capsys: pytest.CaptureFixture[str], command: str) -> None:
    code, out, _ = call(capsys, command, "--help")
    assert code == 0
    assert f"usage: leanstream {command}" in out and "SOURCE" in out
    for option in ("--subfolder DIR", "--variant VARIANT", "--model-class NAME"):
        assert option in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = call(capsys, "--version")
    assert code == 0 and out.strip() == f"leanstream {leanstream.__version__}"


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((), "required: COMMAND"),
        (("frobnicate",), "invalid choice"),
        (("inspect",), "required: SOURCE"),
        (("inspect", "x", "--nope"), "unrecognized arguments: --nope"),
        (("quantize", "a", "b", "--bits", "3"), "--bits: invalid choice"),
        (("quantize", "a"), "required: OUT"),
        (("quantize", "a", "b", "--max-shard-size", "lots"), "--max-shard-size: invalid"),
        (("generate", "a"), "required: --prompt"),
        (("generate", "a", "--prompt", "hi", "--max-new-tokens", "0"), "must be positive"),
        (("generate", "a", "--prompt", "hi", "--dtype", "int8"), "--dtype: invalid choice"),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str], args: tuple[str, ...], match: str
) -> None:
    code, out, err = call(capsys, *args)
    assert code == 2 and out == ""
    assert match in one_error_line(err)


def test_usage_error_as_a_process() -> None:
    result = run("quantize", "a", "b", "--bits", "3")
    assert result.returncode == 2
    assert "--bits" in one_error_line(result.stderr)


# --- inspect ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "llama-tied", "gpt2"])
def test_inspect_predicts_the_footprint(
    sources: dict[str, Path], capsys: pytest.CaptureFixture[str], arch: str
) -> None:
    code, out, err = call(capsys, "inspect", sources[arch], "--json")
    assert code == 0, err
    report = json.loads(out)
    with leanstream.Checkpoint(sources[arch]) as ckpt:
        assert report["tensors"] == len(ckpt)
        assert report["tensor_bytes"] == ckpt.total_bytes
        assert len(report["shards"]) == len(ckpt.files) > 1
    assert report["dtypes"] == {
        "BF16": {"count": report["tensors"], "bytes": report["tensor_bytes"]}
    }
    reference = AutoModelForCausalLM.from_pretrained(sources[arch], device_map="cpu")
    assert report["parameters"] == reference.num_parameters()
    options: dict[str, dict[str, Any]] = {
        "16-bit": dict(bits=16),
        "8-bit (LLM.int8)": dict(bits=8),
        "4-bit nf4": dict(bits=4),
        "4-bit nf4 + double": dict(bits=4, double_quant=True),
        "8-bit + emb/head": dict(bits=8, quantize_embeddings=True, quantize_lm_head=True),
        "4-bit nf4 + emb/head": dict(bits=4, quantize_embeddings=True, quantize_lm_head=True),
        "4-bit nf4 + double + emb/head": dict(
            bits=4, double_quant=True, quantize_embeddings=True, quantize_lm_head=True
        ),
    }
    assert [row["setting"] for row in report["memory"]] == list(options)
    for row in report["memory"]:
        model = leanstream.load(
            sources[arch], device="cpu", progress=False, **options[row["setting"]]
        )
        actual = leanstream.footprint(model)
        assert (row["total_bytes"], row["by_kind"]) == (actual.total_bytes, actual.by_kind), row
    assert report["quantizable_layers"] > 0 and "lm_head" in report["kept_in_full_precision"]


def test_inspect_text(sources: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = call(capsys, "inspect", sources["llama"])
    assert code == 0
    assert "LlamaForCausalLM (llama), dtype bfloat16" in out
    assert "parameters   139,584" in out
    for setting in ("16-bit", "8-bit (LLM.int8)", "4-bit nf4 ", "4-bit nf4 + double"):
        assert setting in out


def test_inspect_a_prequantized_checkpoint(
    sources: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = leanstream.load(sources["llama"], bits=4, quant_type="fp4", device="cpu")
    folder = leanstream.save(model, tmp_path / "fp4", progress=False)
    capsys.readouterr()
    code, out, _ = call(capsys, "inspect", folder, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["quantization"] == "bitsandbytes 4-bit fp4"
    assert report["parameters"] == 139_584
    (row,) = report["memory"]
    loaded = leanstream.footprint(leanstream.load(folder, device="cpu", progress=False))
    assert (row["setting"], row["total_bytes"]) == ("4-bit fp4", loaded.total_bytes)
    code, out, _ = call(capsys, "inspect", folder)
    assert "pre-quantized" in out


def test_inspect_loads_no_weights(
    sources: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("inspect must not stream tensors")

    monkeypatch.setattr(leanstream.Checkpoint, "stream", refuse, raising=False)
    monkeypatch.setattr("leanstream.loader.load", refuse)
    code, _, err = call(capsys, "inspect", sources["llama"])
    assert code == 0, err


#: JSON nested far deeper than Python's recursion limit (json.loads raises RecursionError)
DEEP = "[" * 100_000 + "]" * 100_000


def test_inspect_a_config_nested_deep_as_a_process(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    """Regression: printed ``RecursionError in json``."""
    folder = tmp_path / "deep"
    shutil.copytree(sources["llama"], folder)
    path = folder / "config.json"
    path.write_text(path.read_text().rstrip()[:-1] + f', "deep": {DEEP}}}')
    result = run("inspect", str(folder))
    assert result.returncode == 1 and result.stdout == ""
    line = one_error_line(result.stderr)
    assert f"{path}: nested deeper than" in line and "RecursionError" not in line, line


@pytest.fixture(scope="module")
def nf4(sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The llama checkpoint pre-quantized to nf4 by transformers' ``save_pretrained``."""
    from transformers import BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(
        sources["llama"],
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
        device_map="cpu",
    )
    folder = tmp_path_factory.mktemp("cli-nf4")
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("leanstream_quantized_embeddings", "model.embed_tokens"),  # was listed "m, o, d, e, l"
        ("leanstream_quantized_experts", 5),
        ("leanstream_quantized_lm_head", [1]),
        ("llm_int8_skip_modules", "lm_head"),
    ],
)
@pytest.mark.parametrize("as_json", [False, True])
def test_inspect_refuses_a_module_list_of_the_wrong_type(
    nf4: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    field: str,
    value: Any,
    as_json: bool,
) -> None:
    folder = tmp_path / "m"
    shutil.copytree(nf4, folder)
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"][field] = value
    path.write_text(json.dumps(config))
    code, out, err = call(capsys, "inspect", folder, *(["--json"] if as_json else []))
    assert code == 1 and out == ""
    line = one_error_line(err)
    assert f"{path}: quantization_config.{field} must be a list" in line, line


# --- quantize ----------------------------------------------------------------------


def test_quantize_as_a_process(sources: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "nf4-dq"
    result = run(
        "quantize", str(sources["llama"]), str(out), "--bits", "4", "--double-quant",
        "--max-shard-size", "40KB", "--device", "cpu",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout and "shard(s)" in result.stdout
    assert "leanstream llama" in result.stderr and "leanstream save" in result.stderr  # progress
    assert len(list(out.glob("*.safetensors"))) > 1
    assert (out / "tokenizer.json").exists()
    expected = leanstream.load(sources["llama"], bits=4, double_quant=True, device="cpu")
    theirs = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    qc = theirs.config.quantization_config
    assert qc.load_in_4bit and qc.bnb_4bit_use_double_quant and qc.bnb_4bit_quant_type == "nf4"
    assert torch.equal(logits(theirs), logits(expected))


def test_progress_bars_end_at_100_and_stay(
    sources: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each bar's last state is 100 %, ended by a newline: it stays on the terminal, and a
    log keeps the last state, not the first (a bar cleared with a carriage return left
    only the 0 % line in logs)."""
    out = tmp_path / "out"
    code, _, err = call(capsys, "quantize", sources["llama"], out, "--device", "cpu")
    assert code == 0, err
    lines = err.split("\n")
    finals = [line.rsplit("\r", 1)[-1] for line in lines if line.strip()]
    assert [bar.split(":")[0] for bar in finals] == ["leanstream llama", "leanstream save out"]
    assert all("100%" in bar for bar in finals), finals


def test_quantize_in_process(
    sources: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "int8"
    code, _, err = call(
        capsys, "quantize", sources["gpt2"], out, "--bits", "8", "--no-progress", "--device", "cpu"
    )
    assert code == 0, err
    assert err == ""  # --no-progress
    model = leanstream.load(out, device="cpu", progress=False)
    assert model.is_loaded_in_8bit
    expected = leanstream.load(sources["gpt2"], bits=8, device="cpu", progress=False)
    assert torch.equal(logits(model), logits(expected))


def test_quantize_embeddings_and_lm_head(
    sources: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "all"
    code, _, err = call(
        capsys, "quantize", sources["llama-tied"], out, "--quantize-embeddings",
        "--quantize-lm-head", "--no-progress", "--device", "cpu",
    )  # fmt: skip
    assert code == 0, err
    model = leanstream.load(out, device="cpu", progress=False)
    assert model.model.embed_tokens.weight is model.lm_head.weight
    expected = leanstream.load(
        sources["llama-tied"], device="cpu", progress=False, quantize_embeddings=True
    )
    assert torch.equal(logits(model), logits(expected))
    code, _, err = call(capsys, "quantize", sources["llama"], tmp_path / "x", "--bits", "8",
                        "--quantize-lm-head", "--no-progress", "--device", "cpu")  # fmt: skip
    assert code == 0, err
    code, _, err = call(capsys, "generate", sources["llama"], "--prompt", "hi", "--bits", "16",
                        "--quantize-embeddings", "--no-progress")  # fmt: skip
    assert code == 2 and "--quantize-embeddings: a quantization option" in one_error_line(err)


def test_quantize_errors(
    sources: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep")
    code, _, err = call(capsys, "quantize", sources["llama"], precious, "--no-progress")
    assert code == 1 and "not a checkpoint" in one_error_line(err)
    code, _, err = call(capsys, "quantize", tmp_path / "nope", tmp_path / "out")
    assert code == 1 and "nope" in one_error_line(err)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = call(capsys, "quantize", sources["llama"], blocker / "out", "--no-progress")
    assert code == 1 and str(blocker) in one_error_line(err)  # an OSError, one line too


def test_leanstream_error_as_a_process(tmp_path: Path) -> None:
    result = run("inspect", str(tmp_path / "missing"))
    assert result.returncode == 1
    assert "missing" in one_error_line(result.stderr)


# --- generate ----------------------------------------------------------------------


def test_generate(sources: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    prompt = "the meaning of life is"
    code, out, err = call(
        capsys, "generate", sources["llama"], "--prompt", prompt, "--max-new-tokens", "6",
        "--no-progress", "--device", "cpu",
    )  # fmt: skip
    assert code == 0, err
    model = leanstream.load(sources["llama"], bits=4, device="cpu", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(sources["llama"])
    ids = tokenizer(prompt, return_tensors="pt")
    expected = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=2)
    assert out.strip() == tokenizer.decode(expected[0], skip_special_tokens=True)
    assert out.startswith(prompt) and len(out.split()) == 5 + 6


def test_generate_from_a_prequantized_folder_as_a_process(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    model = leanstream.load(sources["llama"], bits=8, device="cpu", progress=False)
    folder = leanstream.save(model, tmp_path / "int8", progress=False)
    result = run("generate", str(folder), "--prompt", "the meaning", "--max-new-tokens", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("the meaning ") and len(result.stdout.split()) == 2 + 3
    result = run("generate", str(folder), "--prompt", "the", "--bits", "4")
    assert result.returncode == 1
    assert "--bits 4 was asked" in one_error_line(result.stderr)  # as the command spells it


def test_generate_without_a_tokenizer(
    sources: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = call(capsys, "generate", sources["gpt2"], "--prompt", "hello")
    assert code == 1 and out == ""
    assert "no tokenizer files" in one_error_line(err)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("tokenizer.json", "{not json"),
        ("tokenizer.json", '{"x": DEEP}'),  # was "RecursionError in json"
        ("tokenizer_config.json", '{"x": DEEP}'),
    ],
)
def test_generate_with_a_broken_tokenizer(
    sources: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    text: str,
) -> None:
    folder = tmp_path / "m"
    shutil.copytree(sources["llama"], folder)
    (folder / name).write_text(text.replace("DEEP", DEEP))
    code, _, err = call(capsys, "generate", folder, "--prompt", "the", "--no-progress")
    line = one_error_line(err)
    assert code == 1 and f"{folder}: the tokenizer cannot be loaded" in line, line


def test_interrupt(
    sources: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("leanstream.cli.inspect_checkpoint", interrupted)
    code, _, err = call(capsys, "inspect", sources["llama"])
    assert code == 130 and err.strip() == "leanstream: interrupted"


# --- issue 15, item 6: what the command line prints -----------------------------------

#: Ctrl-C while MODULE is being imported (a sitecustomize: it runs before leanstream's import)
INTERRUPT_IMPORT = """
import sys


class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            raise KeyboardInterrupt
        return None


sys.meta_path.insert(0, Interrupt())
"""


@pytest.mark.parametrize(
    ("module", "command"),
    [
        ("torch", ["inspect"]),  # by 'import leanstream', before main() runs
        ("torch", ["quantize", "--max-shard-size", "40KB"]),  # by argparse's type function
        ("transformers", ["inspect"]),
        ("bitsandbytes", ["inspect"]),
    ],
)
def test_interrupt_during_the_imports_is_one_line(
    sources: dict[str, Path], tmp_path: Path, module: str, command: list[str]
) -> None:
    (tmp_path / "sitecustomize.py").write_text(INTERRUPT_IMPORT.format(module=module))
    args = [command[0], str(sources["llama"])]
    if command[0] == "quantize":
        args.append(str(tmp_path / "out"))
    result = run(*args, *command[1:], path=tmp_path)
    assert (result.returncode, result.stderr) == (130, "leanstream: interrupted\n")
    assert result.stdout == ""


def fail_in_bitsandbytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """What bitsandbytes 0.50 does on a CPU with AVX512-BF16 to a 4-bit layer whose
    out_features is not a multiple of 32: its first forward repacks the weight and asserts
    (here: with blocks of 128 rows, which the tiny llama's 64-row layers are not)."""
    import bitsandbytes.functional
    import bitsandbytes.nn.modules

    convert = bitsandbytes.functional._convert_weight_packed_for_cpu
    # an installed bitsandbytes whose conversion leanstream does not reproduce: the
    # conversion is left to its forward
    monkeypatch.setattr(leanstream.cpu_layout, "agrees", lambda: False)
    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)
    monkeypatch.setattr(
        bitsandbytes.nn.modules,
        "_convert_weight_packed_for_cpu",
        functools.partial(convert, block_n=128),
    )


def test_bitsandbytes_error_in_generate_is_one_line(
    sources: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_in_bitsandbytes(monkeypatch)
    args = ["generate", sources["llama"], "--prompt", "the", "--device", "cpu", "--no-progress"]
    code, out, err = call(capsys, *args)
    assert code == 1 and out == ""
    line = one_error_line(err)
    assert line == (
        "leanstream: error: generate: AssertionError in bitsandbytes: N must be divisible "
        "by block_n (--verbose shows the traceback)"
    )
    code, out, err = call(capsys, *args, "--verbose")
    assert code == 1 and out == ""
    assert err.startswith("Traceback (most recent call last):")
    assert "_convert_weight_packed_for_cpu" in err
    *_, last = err.rstrip("\n").split("\n")
    assert last == "leanstream: error: generate: AssertionError in bitsandbytes: N must be " + (
        "divisible by block_n"
    )


def test_a_bug_is_one_line_that_says_so(
    sources: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("leanstream.cli.inspect_checkpoint", lambda *a, **k: {}["folder"])
    code, _, err = call(capsys, "inspect", sources["llama"])
    assert code == 1
    line = one_error_line(err)
    assert line.startswith("leanstream: error: inspect: KeyError in test_cli: 'folder' (")
    assert "--verbose" in line


def test_bitsandbytes_warnings_only_with_verbose(sources: dict[str, Path]) -> None:
    args = [
        "generate",
        str(sources["llama"]),
        "--prompt",
        "the",
        "--bits",
        "8",
        "--max-new-tokens",
        "2",
    ]
    args += ["--device", "cpu", "--no-progress"]
    quiet = run(*args)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""
    loud = run(*args, "--verbose")
    assert loud.returncode == 0, loud.stderr
    assert loud.stdout == quiet.stdout
    lines = loud.stderr.splitlines()
    # on a CPU with AVX512-BF16, importing bitsandbytes first looks for kernels-community's
    # 4-bit kernel and logs that it failed (no `kernels` package here). Asked of a fresh
    # process, as the `leanstream` ones see it: this session's own detection may be forced
    # off (LEANSTREAM_TEST_CPU_KERNEL=plain, conftest.py)
    probe = "from bitsandbytes.functional import has_avx512bf16; print(bool(has_avx512bf16()))"
    detected = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=True
    ).stdout.split()
    assert detected in (["True"], ["False"]), detected
    if detected == ["True"]:
        assert lines.pop(0).startswith(
            "Failed to load CPU gemm_4bit_forward from kernels-community: "
        ), loud.stderr
    assert lines, loud.stderr
    assert lines[0].startswith("MatMul8bitLt: inputs will be cast from torch.bfloat16")
    assert not any("kernels-community" in line for line in lines), loud.stderr
    assert run("-v", *args).stderr == loud.stderr  # before the command too


def test_bitsandbytes_kernel_warning_only_with_verbose(
    sources: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What importing bitsandbytes 0.50 logs on a CPU with AVX512-BF16 without ``kernels``."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    message = (
        "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
        "already `pip install kernels` and the kernels >= 0.11.1"
    )
    inspect = leanstream.cli.inspect_checkpoint

    def importing_bitsandbytes(*args: Any, **kwargs: Any) -> Any:
        logger.warning(message, ModuleNotFoundError("No module named 'kernels'"))
        return inspect(*args, **kwargs)

    monkeypatch.setattr("leanstream.cli.inspect_checkpoint", importing_bitsandbytes)
    assert call(capsys, "inspect", sources["llama"])[0] == 0
    assert not [r for r in caplog.records if "gemm_4bit_forward" in r.getMessage()]
    assert call(capsys, "inspect", sources["llama"], "-v")[0] == 0
    assert [r.name for r in caplog.records if "gemm_4bit_forward" in r.getMessage()] == [
        logger.name
    ]
    caplog.clear()
    logger.warning(message, "after main()")  # the filter goes with the command
    assert len(caplog.records) == 1


def test_sizes_in_binary_units_as_a_process(sources: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "nf4"
    result = run("quantize", str(sources["llama"]), str(out), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    with leanstream.Checkpoint(sources["llama"]) as ckpt:
        total = format_bytes(ckpt.total_bytes)
    assert total.endswith(" KiB")
    bar = re.search(
        r"leanstream llama: .*?\| (\S+ \S+)/(\S+ \S+) \[.*?, (\S+ \S+)\]", result.stderr
    )
    assert bar is not None, result.stderr
    assert bar[2] == total and bar[1].endswith((" B", " KiB")) and bar[3].endswith("B/s"), bar[0]
    # quantize loads the plain layout (what it saves: bitsandbytes' fused CPU one keeps
    # bfloat16 scales only)
    model = leanstream.load(out, device="cpu", progress=False, cpu_kernel="plain")
    on_disk = format_bytes(sum(f.stat().st_size for f in out.glob("*.safetensors")))
    in_memory = format_bytes(leanstream.footprint(model).total_bytes)
    assert result.stdout == f"wrote {out}: 1 shard(s), {on_disk}; in memory {in_memory}\n"
    assert on_disk.endswith(" KiB") and in_memory.endswith(" KiB")


def test_inspect_table_is_aligned(
    sources: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = call(capsys, "inspect", sources["llama"])
    assert code == 0
    lines = out.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.startswith("memory")) :]
    if packs():  # a last line says the 4-bit rows are in bitsandbytes' fused CPU layout
        assert "AVX512-BF16 CPU layout" in table.pop()
    assert len(table) == 1 + 7 and "4-bit nf4 + double + emb/head" in out
    rows = [re.fullmatch(r"(memory)? +(\S.*?)  +(total|\S+ \S*B)  (\S.*)", row) for row in table]
    assert all(rows), "\n".join(table)
    columns = {(row.start(2), row.end(3), row.start(4)) for row in rows}  # type: ignore[union-attr]
    assert len(columns) == 1, "\n".join(table)  # setting left-, total right-aligned
    assert " kB" not in out and "KiB" in out


# --- issue 17: diffusers components, --subfolder, --variant, --model-class ----------------

#: inspect's settings without the embeddings flags -> load()'s options
PLAIN_SETTINGS: dict[str, dict[str, Any]] = {
    "16-bit": dict(bits=None),
    "8-bit (LLM.int8)": dict(bits=8),
    "4-bit nf4": dict(bits=4),
    "4-bit nf4 + double": dict(bits=4, double_quant=True),
}


@pytest.fixture(scope="module")
def dm() -> Any:
    """tests/diffusers_models.py (skipped without diffusers)."""
    pytest.importorskip("diffusers")
    import diffusers_models

    return diffusers_models


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BertModel checkpoint: a base model, whose config's causal LM class
    (BertLMHeadModel) does not match it."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("bert")
    config = BertConfig(
        vocab_size=320,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
    )
    BertModel(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


def loaded(source: Path, **options: Any) -> Any:
    return leanstream.load(source, device="cpu", progress=False, **options)


def typed(message: str, *options: tuple[str, str]) -> str:
    """``message`` on one line, with the keyword arguments it suggests written as the
    command line's options (``options``: (keyword, option) pairs, checked to be there)."""
    line = " ".join(message.split())
    for keyword, option in options:
        assert keyword in line, (keyword, line)
        line = line.replace(keyword, option)
    return line


def error_of(call: Any) -> str:
    """The message of the LeanstreamError ``call()`` raises."""
    with pytest.raises(leanstream.LeanstreamError) as err:
        call()
    return str(err.value)


def assert_predicts(report: dict[str, Any], source: Path, **options: Any) -> None:
    """Every row of inspect's report is footprint() after load with that setting."""
    assert [row["setting"] for row in report["memory"]] == list(PLAIN_SETTINGS)
    for row in report["memory"]:
        actual = leanstream.footprint(loaded(source, **PLAIN_SETTINGS[row["setting"]], **options))
        assert (row["total_bytes"], row["by_kind"]) == (actual.total_bytes, actual.by_kind), row


@pytest.mark.parametrize("kind", ["flux", "sd3", "unet"])
def test_inspect_a_diffusers_component(
    dm: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    folder = dm.write_model(tmp_path / kind, kind, max_shard_size="40KB")
    code, out, err = call(capsys, "inspect", folder, "--json")
    assert code == 0, err
    report = json.loads(out)
    class_name = dm.TINY[kind][0]
    assert (report["architecture"], report["class_name"]) == (class_name, class_name)
    assert report["model_type"] is None
    with leanstream.Checkpoint(folder / "diffusion_pytorch_model.safetensors.index.json") as ckpt:
        assert len(report["shards"]) == len(ckpt.files) > 1
        assert (report["tensors"], report["tensor_bytes"]) == (len(ckpt), ckpt.total_bytes)
    reference = dm.reference(folder, bits=4)
    assert report["parameters"] == sum(p.numel() for p in dm.make_model(kind).parameters())
    # every linear quantized (diffusers' rule, with no _keep_in_fp32_modules: none kept)
    assert report["kept_in_full_precision"] == []
    linears = [m for m in reference.modules() if isinstance(m, torch.nn.Linear)]
    assert report["quantizable_layers"] == len(linears)
    assert_predicts(report, folder)
    # and what diffusers' own bitsandbytes quantization of it takes
    memory = {row["setting"]: row for row in report["memory"]}
    if report["cpu_layout"]:  # predicted for this CPU: as after diffusers' first forward
        like_first_forward(reference)
    for setting, bits in (("4-bit nf4", 4), ("8-bit (LLM.int8)", 8)):
        theirs = leanstream.footprint(reference if bits == 4 else dm.reference(folder, bits=8))
        row = memory[setting]
        assert (row["total_bytes"], row["by_kind"]) == (theirs.total_bytes, theirs.by_kind)
    code, out, _ = call(capsys, "inspect", folder)
    assert code == 0
    assert f"model        {class_name} (diffusers), dtype bfloat16" in out
    assert "quantized at 8/4 bits; kept: none" in out


def test_inspect_keeps_the_fp32_modules_of_a_diffusers_component(
    dm: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``_keep_in_fp32_modules`` (a FLUX given some): kept in full precision, float32."""
    import diffusers

    folder = dm.write_flux(tmp_path / "flux")
    fp32 = ["time_text_embed", "norm_out"]
    monkeypatch.setattr(diffusers.FluxTransformer2DModel, "_keep_in_fp32_modules", fp32)
    code, out, err = call(capsys, "inspect", folder, "--json")
    assert code == 0, err
    report = json.loads(out)
    kept = report["kept_in_full_precision"]
    assert kept and all(name.startswith(tuple(fp32)) for name in kept)
    assert all(row["by_kind"]["float32"] > 0 for row in report["memory"])
    assert_predicts(report, folder)
    memory = {row["setting"]: row for row in report["memory"]}
    for setting, bits in (("4-bit nf4", 4), ("8-bit (LLM.int8)", 8)):
        reference = dm.reference(folder, bits=bits)
        if report["cpu_layout"]:  # predicted for this CPU: as after diffusers' first forward
            like_first_forward(reference)
        theirs = leanstream.footprint(reference)
        assert (memory[setting]["total_bytes"], memory[setting]["by_kind"]) == (
            theirs.total_bytes,
            theirs.by_kind,
        )


def test_inspect_matches_diffusers_on_an_fp32_pattern_inside_a_name(
    dm: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import diffusers

    from leanstream.cli import inspect_checkpoint

    folder = dm.write_flux(tmp_path / "flux")
    monkeypatch.setattr(diffusers.FluxTransformer2DModel, "_keep_in_fp32_modules", ["norm"])
    report = inspect_checkpoint(folder)
    memory = {row["setting"]: row for row in report["memory"]}
    reference = dm.reference(folder, bits=4)
    if report["cpu_layout"]:  # predicted for this CPU: as after diffusers' first forward
        like_first_forward(reference)
    theirs = leanstream.footprint(reference)
    assert (memory["4-bit nf4"]["total_bytes"], memory["4-bit nf4"]["by_kind"]) == (
        theirs.total_bytes,
        theirs.by_kind,
    )


def test_subfolder_of_a_pipeline(
    dm: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = dm.write_pipeline_repo(tmp_path / "repo", "flux")
    refused = error_of(lambda: loaded(root, bits=4))
    assert "subfolder='transformer'" in refused
    # on the command line, the option as the command line spells it
    flags = " ".join(refused.split()).replace("subfolder='transformer'", "--subfolder transformer")
    for args in (("inspect", root), ("quantize", root, tmp_path / "out", "--no-progress")):
        code, out, err = call(capsys, *args)
        assert (code, out) == (1, "")
        assert one_error_line(err) == f"leanstream: error: {flags}"
    assert not (tmp_path / "out").exists()

    code, out, err = call(capsys, "inspect", root, "--subfolder", "transformer", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["folder"] == str((root / "transformer").resolve())
    assert report["class_name"] == "FluxTransformer2DModel"
    assert_predicts(report, root, subfolder="transformer")

    out_folder = tmp_path / "nf4"
    code, out, err = call(
        capsys, "quantize", root, out_folder, "--subfolder", "transformer", "--no-progress",
        "--device", "cpu",
    )  # fmt: skip
    assert code == 0, err
    assert out.startswith(f"wrote {out_folder}: ")
    config = json.loads((out_folder / "config.json").read_text())
    assert config["_class_name"] == "FluxTransformer2DModel"
    again = loaded(out_folder)
    expected = loaded(root, subfolder="transformer", bits=4)
    assert assert_same_weights(expected, again) > 0
    assert torch.equal(dm.forward(again), dm.forward(expected))
    # the pre-quantized component it wrote: inspect predicts what load makes of it
    code, out, err = call(capsys, "inspect", out_folder, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["quantization"] == "bitsandbytes 4-bit nf4"
    (row,) = report["memory"]
    actual = leanstream.footprint(again)
    assert (row["setting"], row["total_bytes"], row["by_kind"]) == (
        "4-bit nf4",
        actual.total_bytes,
        actual.by_kind,
    )


def test_variant(dm: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = dm.write_flux(tmp_path / "flux", seed=1)
    dm.write_flux(folder, variant="fp16", dtype=torch.float16, seed=2)
    refused = error_of(lambda: loaded(folder, bits=4))
    assert "several variants" in refused
    for args in (("inspect", folder), ("quantize", folder, tmp_path / "out", "--no-progress")):
        code, _, err = call(capsys, *args)
        assert code == 1
        flags = typed(refused, ("variant='fp16'", "--variant fp16"), ("variant=", "--variant"))
        assert one_error_line(err) == f"leanstream: error: {flags}"

    code, out, err = call(capsys, "inspect", folder, "--variant", "fp16", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["shards"] == ["diffusion_pytorch_model.fp16.safetensors"]
    assert list(report["dtypes"]) == ["F16"] and report["dtype"] == "float16"
    assert_predicts(report, folder, variant="fp16")
    code, _, err = call(capsys, "inspect", folder, "--variant", "bf16")
    assert code == 1 and "no weights of the variant 'bf16'" in one_error_line(err)

    out_folder = tmp_path / "int8"
    code, _, err = call(
        capsys, "quantize", folder, out_folder, "--variant", "fp16", "--bits", "8",
        "--no-progress", "--device", "cpu",
    )  # fmt: skip
    assert code == 0, err
    again = loaded(out_folder)
    expected = loaded(folder, variant="fp16", bits=8)
    assert assert_same_weights(expected, again) > 0
    assert torch.equal(
        dm.forward(again, dtype=torch.float16), dm.forward(expected, dtype=torch.float16)
    )


def test_model_class(bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModel, AutoModelForCausalLM, BertModel

    # the config's causal LM class (BertLMHeadModel) does not fit: refused, as load refuses it
    refused = error_of(lambda: loaded(bert, bits=4, model_class=AutoModelForCausalLM))
    assert "cls.predictions" in refused
    code, _, err = call(capsys, "inspect", bert, "--model-class", "AutoModelForCausalLM")
    assert code == 1
    assert (
        one_error_line(err)
        == f"leanstream: error: {typed(refused, ('model_class=', '--model-class'))}"
    )

    code, out, err = call(capsys, "inspect", bert, "--model-class", "AutoModel", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert (report["architecture"], report["model_type"]) == ("BertModel", "bert")
    assert report["parameters"] == BertModel.from_pretrained(bert).num_parameters()
    settings = {
        **PLAIN_SETTINGS,
        "8-bit + emb/head": dict(bits=8, quantize_embeddings=True),
        "4-bit nf4 + emb/head": dict(bits=4, quantize_embeddings=True),
        "4-bit nf4 + double + emb/head": dict(bits=4, double_quant=True, quantize_embeddings=True),
    }
    assert [row["setting"] for row in report["memory"]] == list(settings)
    for row in report["memory"]:
        actual = leanstream.footprint(
            loaded(bert, model_class=AutoModel, **settings[row["setting"]])
        )
        assert (row["total_bytes"], row["by_kind"]) == (actual.total_bytes, actual.by_kind), row
    code, out, _ = call(capsys, "inspect", bert, "--model-class", "BertModel", "--json")
    assert code == 0 and json.loads(out) == report
    code, out, _ = call(capsys, "inspect", bert, "--json")  # architectures names BertModel
    assert code == 0 and json.loads(out) == report

    out_folder = tmp_path / "nf4"
    code, _, err = call(
        capsys, "quantize", bert, out_folder, "--model-class", "AutoModel", "--no-progress",
        "--device", "cpu",
    )  # fmt: skip
    assert code == 0, err
    again = loaded(out_folder, model_class=AutoModel)
    expected = loaded(bert, bits=4, model_class=AutoModel)
    assert type(again) is BertModel
    ids = torch.tensor([[1, 5, 7, 9]])
    assert torch.equal(again(ids).last_hidden_state, expected(ids).last_hidden_state)


@pytest.mark.parametrize("command", ["inspect", "quantize", "generate"])
def test_model_class_errors_are_one_line(
    sources: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    args = {
        "inspect": ["inspect", sources["llama"]],
        "quantize": ["quantize", sources["llama"], tmp_path / "out", "--no-progress"],
        "generate": ["generate", sources["llama"], "--prompt", "the", "--no-progress"],
    }[command]
    code, out, err = call(capsys, *args, "--model-class", "NoSuchModel")
    assert (code, out) == (1, "")
    assert one_error_line(err) == (
        "leanstream: error: --model-class NoSuchModel: transformers "
        f"{transformers.__version__} has no such class (a model class such as BertModel, "
        "or an Auto class such as AutoModel, AutoModelForSeq2SeqLM)"
    )
    # a class that exists but cannot be built for this config: load's own error
    code, out, err = call(capsys, *args, "--model-class", "AutoModelForSeq2SeqLM")
    assert (code, out) == (1, "")
    line = one_error_line(err)
    assert "AutoModelForSeq2SeqLM cannot be built for model_type 'llama'" in line
    assert not (tmp_path / "out").exists()


def test_model_class_with_a_diffusers_component(
    dm: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModel

    folder = dm.write_flux(tmp_path / "flux")
    refused = error_of(lambda: loaded(folder, model_class=AutoModel))
    assert "diffusers config" in refused
    code, _, err = call(capsys, "inspect", folder, "--model-class", "AutoModel")
    assert code == 1
    assert (
        one_error_line(err)
        == f"leanstream: error: {typed(refused, ('model_class=', '--model-class'))}"
    )


def test_generate_refuses_a_diffusers_component(
    dm: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = dm.write_pipeline_repo(tmp_path / "repo", "flux")
    code, out, err = call(capsys, "generate", root, "--subfolder", "transformer", "--prompt", "a")
    assert (code, out) == (1, "")
    line = one_error_line(err)
    assert "diffusers FluxTransformer2DModel, not a transformers language model" in line
    assert str((root / "transformer").resolve()) in line


# --- issue 18: inspect --device-map / --max-memory: the plan load makes, printed ---------


class Planned(Exception):
    """Raised by :func:`plan_of_load`'s planner once ``load`` has made its plan."""


def plan_of_load(
    monkeypatch: pytest.MonkeyPatch, source: Path, **options: Any
) -> tuple[dict[str, Any], dict[str, int]]:
    """The device_map ``leanstream.load(source, **options)`` plans, and the tensor sizes it
    plans with: its own call of ``placement.plan``, recorded, and the load stopped there
    (the GPUs planned for need not exist)."""
    from leanstream import placement

    seen: dict[str, Any] = {}
    plan = placement.plan

    def record(model: Any, sizes: Any, device_map: Any, max_memory: Any) -> Any:
        seen["plan"] = plan(model, sizes, device_map, max_memory)
        seen["sizes"] = dict(sizes)
        raise Planned

    monkeypatch.setattr(placement, "plan", record)
    with pytest.raises(Planned):
        leanstream.load(source, progress=False, **options)
    monkeypatch.undo()
    return seen["plan"], seen["sizes"]


def planned(capsys: pytest.CaptureFixture[str], source: Path, *args: str) -> dict[str, Any]:
    code, out, err = call(capsys, "inspect", source, "--json", *args)
    assert code == 0 and err == "", err  # no "Device 0 is not available" from accelerate
    return json.loads(out)


def budgets(total: int, gpu: float) -> tuple[str, dict[int | str, int]]:
    """``--max-memory`` for two GPUs of ``gpu`` times the model (and room on the CPU), in
    bytes, and the same as load's ``max_memory``."""
    budget: dict[int | str, int] = {0: int(total * gpu), 1: int(total * gpu), "cpu": 2 * total}
    return ",".join(f"{k}={v}" for k, v in budget.items()), budget


#: inspect's --bits / --quant-type / --double-quant -> load's options
PLANNED: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "4-bit nf4": ((), dict(bits=4)),
    "4-bit fp4 + double": (
        ("--quant-type", "fp4", "--double-quant"),
        dict(bits=4, quant_type="fp4", double_quant=True),
    ),
    "8-bit (LLM.int8)": (("--bits", "8"), dict(bits=8)),
    "16-bit": (("--bits", "16"), dict(bits=None)),
}


@pytest.mark.parametrize("setting", list(PLANNED))
@pytest.mark.parametrize("arch", ["llama", "llama-tied", "gpt2"])
def test_inspect_plans_what_load_plans(
    sources: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    arch: str,
    setting: str,
) -> None:
    """Two simulated GPUs of given sizes and the CPU: inspect's plan is the one ``load``
    makes with those options (accelerate's, on the same quantized meta model, with the
    same sizes), and its bytes per device add up to the memory predicted for the setting."""
    args, options = PLANNED[setting]
    total = planned(capsys, sources[arch])["memory"][0]["total_bytes"]  # 16-bit
    for strategy, gpu in (("auto", 0.45), ("sequential", 0.3), ("balanced_low_0", 0.7)):
        text, budget = budgets(total, gpu)
        report = planned(
            capsys, sources[arch], "--device-map", strategy, "--max-memory", text, *args
        )
        plan, sizes = plan_of_load(
            monkeypatch, sources[arch], device_map=strategy, max_memory=budget, **options
        )
        assert report["device_map"] == plan, (strategy, report["device_map"])
        assert {0, 1} & set(plan.values()), plan  # the GPUs are planned, though absent
        used = leanstream.placement.per_device(plan, sizes)
        assert report["per_device"] == {str(d): n for d, n in used.items()}
        (row,) = [row for row in report["memory"] if row["setting"] == setting]
        assert report["planned_setting"] == setting
        assert sum(report["per_device"].values()) == row["total_bytes"]
        assert report["max_memory"] == {str(k): v for k, v in budget.items()}


@pytest.mark.parametrize("kind", ["qwen3_moe", "flux"])
def test_inspect_plans_moe_experts_and_a_diffusers_component(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> None:
    """Quantized 3-D experts weights, and a diffusers component's float32 modules, are
    planned at the sizes load plans them."""
    if kind == "flux":
        dm = request.getfixturevalue("dm")
        folder = dm.write_model(tmp_path / kind, kind, max_shard_size="40KB")
    else:
        from models import write_model

        folder = write_model(tmp_path / kind, kind)
    capsys.readouterr()
    # in the plain layout, which a plan sizes (not bitsandbytes' fused CPU one)
    report = planned(capsys, folder, "--cpu-kernel", "plain")
    memory = {row["setting"]: row["total_bytes"] for row in report["memory"]}
    text, budget = budgets(memory["4-bit nf4"], 0.45)
    report = planned(capsys, folder, "--device-map", "sequential", "--max-memory", text)
    plan, sizes = plan_of_load(
        monkeypatch, folder, bits=4, device_map="sequential", max_memory=budget
    )
    assert report["device_map"] == plan and {0, 1} & set(plan.values())
    assert sum(report["per_device"].values()) == sum(sizes.values()) == memory["4-bit nf4"]


def test_inspect_plans_a_prequantized_checkpoint(
    sources: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Embeddings and lm_head stored quantized are planned at their quantized size."""
    model = leanstream.load(  # the plain layout, which a plan sizes
        sources["llama"],
        bits=4,
        quantize_embeddings=True,
        quantize_lm_head=True,
        progress=False,
        cpu_kernel="plain",
    )
    folder = leanstream.save(model, tmp_path / "nf4", progress=False)
    total = leanstream.footprint(model).total_bytes
    text, budget = budgets(total, 0.45)
    report = planned(capsys, folder, "--device-map", "auto", "--max-memory", text)
    plan, sizes = plan_of_load(monkeypatch, folder, device_map="auto", max_memory=budget)
    assert report["device_map"] == plan
    assert sum(report["per_device"].values()) == sum(sizes.values()) == total
    assert report["planned_setting"] == "4-bit nf4 + emb/head"
    code, _, err = call(capsys, "inspect", folder, "--device-map", "auto", "--bits", "8")
    assert code == 1 and "pre-quantized" in one_error_line(err)


def test_inspect_plan_that_does_not_fit_is_loads_error(
    sources: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    budget = {0: "20KB", 1: "20KB", "cpu": "40KB"}
    with pytest.raises(leanstream.ConfigError) as error:
        leanstream.load(sources["llama"], device_map="auto", max_memory=budget)
    code, out, err = call(
        capsys, "inspect", sources["llama"], "--device-map", "auto",
        "--max-memory", "0=20KB,1=20KB,cpu=40KB",
    )  # fmt: skip
    assert code == 1 and out == ""
    assert one_error_line(err) == f"leanstream: error: {error.value}"
    assert "does not fit" in err and "of 20KB" in err


@pytest.mark.parametrize(
    ("budget", "match"),
    [
        ("0:22GiB", "'0:22GiB': expected DEVICE=SIZE"),
        ("0=22XB", "invalid size '22XB'"),
        ("=1GB", "expected DEVICE=SIZE"),
        ("gpu0=1GB", "expected DEVICE=SIZE"),
        ("0=", "expected DEVICE=SIZE"),
        ("0=1GB,", "'': expected DEVICE=SIZE"),
        ("0=1GB,cuda:0=2GB", "device cuda:0 given twice"),
    ],
)
def test_inspect_bad_max_memory_is_one_line(
    sources: dict[str, Path], capsys: pytest.CaptureFixture[str], budget: str, match: str
) -> None:
    code, out, err = call(
        capsys, "inspect", sources["llama"], "--device-map", "auto", "--max-memory", budget
    )
    assert code == 2 and out == ""
    line = one_error_line(err)
    assert "argument --max-memory" in line and match in line, line


@pytest.mark.parametrize(
    ("args", "match"),
    [
        # (--max-memory or --bits without --device-map: usage errors, issue 26)
        (("--device-map", "auto", "--max-memory", "disk=100GB"), "'disk' offload"),
        # and no warning from accelerate's planner about buffers of offloaded layers
        (("--device-map", "auto", "--max-memory", "0=10KB,cpu=20KB"), "(the whole model) would"),
    ],
)
def test_inspect_plan_errors_are_one_line(
    sources: dict[str, Path], capsys: pytest.CaptureFixture[str], args: Any, match: str
) -> None:
    code, out, err = call(capsys, "inspect", sources["llama"], *args)
    assert code == 1 and out == ""
    assert match in one_error_line(err)


def test_inspect_prints_the_plan_condensed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The text is load's plan: one line per run of modules on one device, numbered
    siblings condensed (``model.layers.2-6``), then the bytes on each device."""
    from models import write_model

    folder = write_model(tmp_path / "deep", "llama", num_hidden_layers=8)
    capsys.readouterr()
    budget = {0: 150_000, 1: 150_000, "cpu": "1MB"}
    args = ("--device-map", "sequential", "--max-memory", "0=150000,1=150000,cpu=1MB")
    code, out, err = call(capsys, "inspect", folder, *args)
    assert code == 0 and err == ""
    plan, sizes = plan_of_load(monkeypatch, folder, device_map="sequential", max_memory=budget)
    lines = out.splitlines()
    lines = lines[next(i for i, line in enumerate(lines) if line.startswith("plan ")) :]
    assert lines[0] == "plan         4-bit nf4, device_map sequential, max_memory " + (
        "0=150000, 1=150000, cpu=1MB"
    )
    printed: list[tuple[str, Any]] = []  # the plan read back from the text
    runs = [line.strip().split(" -> ") for line in lines[1:] if " -> " in line]
    for names, device in runs:
        entry = int(device.removeprefix("cuda:")) if device.startswith("cuda:") else device
        for name in names.split(", "):
            stem, _, numbers = name.rpartition(".")
            first, _, last = numbers.partition("-")
            for i in range(int(first), int(last or first) + 1) if first.isdigit() else [None]:
                printed.append((name if i is None else f"{stem}.{i}", entry))
    assert printed == list(plan.items())
    assert len(runs) == 3 and any(re.search(r"model\.layers\.\d+-\d+", n) for n, _ in runs)
    used = leanstream.placement.per_device(plan, sizes)
    shown = [line[13:].split() for line in lines[1 + len(runs) :]]
    assert lines[1 + len(runs)].startswith("per device   ")
    assert [(d, f"{n} {u}", b) for d, n, u, _, b in shown] == [
        ("cuda:0", format_bytes(used[0]), "150000"),
        ("cuda:1", format_bytes(used[1]), "150000"),
        ("cpu", format_bytes(used["cpu"]), "1MB"),
    ]


def test_condense() -> None:
    from leanstream.cli import _condense

    names = ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.layers.2"]
    names += ["model.layers.4", "model.layers.5.mlp", "model.layers.6", "lm_head", "0", ""]
    assert _condense(names) == [
        "model.embed_tokens",
        "model.layers.0-2",
        "model.layers.4",
        "model.layers.5.mlp",
        "model.layers.6",
        "lm_head",
        "0",
        "(the whole model)",
    ]


def test_strategies_are_placements() -> None:
    from leanstream.cli import _STRATEGIES

    assert _STRATEGIES == list(leanstream.placement.STRATEGIES)


def test_inspect_plan_loads_no_weights(
    sources: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("inspect must not stream tensors")

    monkeypatch.setattr(leanstream.Checkpoint, "stream", refuse, raising=False)
    monkeypatch.setattr("leanstream.loader.load", refuse)
    args = ("--device-map", "balanced", "--max-memory", "0=100KB,1=100KB,cpu=1MB")
    code, _, err = call(capsys, "inspect", sources["llama"], *args)
    assert code == 0, err


# --- issue 26: command-line friction -----------------------------------------------------


@pytest.fixture
def no_load(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, dict[str, Any]]]:
    """``leanstream.load`` replaced by one that records its call and refuses (so that
    nothing is loaded and nothing saved): the calls made."""
    calls: list[tuple[Any, dict[str, Any]]] = []

    def load(source: Any, **options: Any) -> Any:
        calls.append((source, options))
        raise leanstream.ConfigError("load called")

    monkeypatch.setattr("leanstream.loader.load", load)
    return calls


def test_skip_modules_leaves_the_positionals_alone(
    sources: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_load: list[tuple[Any, dict[str, Any]]],
) -> None:
    """Regression (issue 26): ``--skip-modules X SRC OUT`` took SRC and OUT as module
    names. One value per use, comma-separated names, repeatable."""
    code, _, err = call(
        capsys, "quantize", "--skip-modules", "lm_head,model.layers.0.mlp",
        "--skip-modules", "model.layers.1", sources["llama"], tmp_path / "out",
    )  # fmt: skip
    assert code == 1 and "load called" in one_error_line(err)
    ((_, options),) = no_load
    assert options["skip_modules"] == ["lm_head", "model.layers.0.mlp", "model.layers.1"]
    code, _, err = call(
        capsys, "quantize", sources["llama"], tmp_path / "out", "--skip-modules", "a", "b"
    )
    assert code == 2 and "unrecognized arguments: b" in one_error_line(err)
    code, _, err = call(capsys, "quantize", sources["llama"], "out", "--skip-modules", "a,,b")
    assert code == 2 and "--skip-modules: empty module name in 'a,,b'" in one_error_line(err)
    assert len(no_load) == 1


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("quantize", "S", "O", "--bits", "8", "--double-quant"), "--double-quant: a 4-bit"),
        (("quantize", "S", "O", "--bits", "8", "--quant-type", "fp4"), "--quant-type: a 4-bit"),
        (("quantize", "S", "O", "--bits", "8", "--compute-dtype", "float16"), "--compute-dtype"),
        (("generate", "S", "--prompt", "hi", "--bits", "8", "--double-quant"), "--bits 8"),
        (("generate", "S", "--prompt", "hi", "--bits", "16", "--skip-modules", "x"), "--bits 16"),
        (("generate", "S", "--prompt", "hi", "--bits", "16", "--quantize-embeddings"), "--bits 16"),
        (("inspect", "S", "--max-memory", "cpu=1GB"), "--max-memory needs --device-map"),
        (("inspect", "S", "--bits", "8"), "--bits: chooses the setting --device-map plans"),
        (("inspect", "S", "--double-quant"), "--double-quant: chooses the setting"),
        (("inspect", "S", "--device-map", "auto", "--bits", "8", "--quant-type", "fp4"), "4-bit"),
        (("inspect", "S", "--device-map", "auto", "--bits", "16", "--double-quant"), "--bits 16"),
    ],
)
def test_option_combinations_that_cannot_work_are_usage_errors(
    sources: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_load: list[tuple[Any, dict[str, Any]]],
    args: tuple[str, ...],
    match: str,
) -> None:
    """Regression (issue 26): they exited 1, after the checkpoint was opened. Now a usage
    error (exit 2, one line naming the command's --help), before anything is read."""
    where = {"S": str(sources["llama"]), "O": str(tmp_path / "out")}
    code, out, err = call(capsys, *(where.get(a, a) for a in args))
    assert code == 2 and out == "" and not no_load
    line = one_error_line(err)
    assert match in line and line.endswith(f"(see 'leanstream {args[0]} --help')"), line


def test_quantize_checks_out_before_loading(
    sources: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_load: list[tuple[Any, dict[str, Any]]],
) -> None:
    """Regression (issue 26): OUT was checked only by save, after the whole load."""
    source = sources["llama"]
    linked = tmp_path / "linked"
    linked.symlink_to(source)
    afile = tmp_path / "file"
    afile.write_text("x")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep")
    for out, match in [
        (source, "the model was loaded from this folder"),
        (linked, "the model was loaded from this folder"),  # the same folder, another name
        (afile, "exists and is not a folder"),
        (afile / "out", f"{afile} is not a folder"),
        (precious, "non-empty folder that is not a checkpoint"),
    ]:
        code, _, err = call(capsys, "quantize", source, out, "--no-progress")
        assert code == 1 and match in one_error_line(err), (out, err)
    assert not no_load
    assert afile.read_text() == "x" and [p.name for p in precious.iterdir()] == ["notes.txt"]
    code, _, err = call(capsys, "quantize", source, tmp_path / "new", "--no-progress")
    assert code == 1 and "load called" in one_error_line(err)
    assert [folder for folder, _ in no_load] == [source.resolve()]
