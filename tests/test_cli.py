"""The ``leanstream`` command line, in-process (``main([...])``) and as ``python -m leanstream``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from test_load import logits
from transformers import AutoModelForCausalLM, AutoTokenizer

import leanstream
from leanstream.cli import main

PACKAGE_ROOT = str(Path(leanstream.__file__).resolve().parent.parent)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m leanstream ARGS`` in a fresh process importing this checkout's package."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")]),
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
    assert code == 1 and "bits=4 or bits=8" in one_error_line(err)


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
    assert "bits=4 was asked" in one_error_line(result.stderr)


def test_generate_without_a_tokenizer(
    sources: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = call(capsys, "generate", sources["gpt2"], "--prompt", "hello")
    assert code == 1 and out == ""
    assert "no tokenizer files" in one_error_line(err)


def test_generate_with_a_broken_tokenizer(
    sources: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(sources["llama"], folder)
    (folder / "tokenizer.json").write_text("{not json")
    code, _, err = call(capsys, "generate", folder, "--prompt", "the", "--no-progress")
    assert code == 1 and "tokenizer" in one_error_line(err)


def test_interrupt(
    sources: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("leanstream.cli.inspect_checkpoint", interrupted)
    code, _, err = call(capsys, "inspect", sources["llama"])
    assert code == 130 and err.strip() == "leanstream: interrupted"
