"""The architecture sweep (issue 26, ``tests/sweep.py``): tiny random models of transformers'
registries loaded by leanstream at nf4 and int8 end as transformers + bitsandbytes' model
(``equal``), run where it fails (``beyond``) or are refused with a LeanstreamError
(``refused``); never a crash, other logits, or an ``inspect`` that mispredicts the load.

By default a fast subset chosen for coverage (Conv1D, MoE, seq2seq, encoder, vision,
image-text, the types issue 26 reported broken); ``LEANSTREAM_SWEEP=all`` runs every case
(long: ``benches/sweep.py`` prints the same as a table).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import sweep
from sweep import Case

FAST = [
    Case("causal-lm", "llama"),
    Case("causal-lm", "gpt2"),  # Conv1D
    Case("causal-lm", "qwen3_moe"),  # MoE experts, quantized by leanstream
    Case("causal-lm", "mixtral"),
    Case("seq2seq", "t5"),
    Case("causal-lm", "whisper"),
    Case("masked-lm", "bert"),
    Case("vision", "vit"),
    Case("image-text", "llava"),
    # reported broken in issue 26
    Case("causal-lm", "falcon"),
    Case("causal-lm", "phimoe"),
    Case("causal-lm", "llama4_text"),
    Case("causal-lm", "mamba"),
    Case("causal-lm", "longcat_flash"),
    Case("causal-lm", "openai-gpt"),
    Case("causal-lm", "xglm"),
    Case("causal-lm", "musicgen"),
    Case("causal-lm", "ernie4_5_moe"),
    Case("causal-lm", "deepseek_v3"),
    Case("causal-lm", "falcon_h1"),
    # found by the sweep
    Case("vision", "siglip"),  # nn.MultiheadAttention reads out_proj.weight
    Case("seq2seq", "marian"),  # sinusoidal positions the checkpoint leaves out
    Case("causal-lm", "jetmoe"),  # experts of 32-value rows
    Case("causal-lm", "gptj"),  # a buffer _init_weights recomputes in float32
    Case("vision", "segformer"),  # strided inputs to 4-bit layers
]
EVERY = os.environ.get("LEANSTREAM_SWEEP") == "all"
RUNS = [
    pytest.param(case, setting, id=f"{case.id}/{setting}")
    for case in (sweep.cases() if EVERY else FAST)
    for setting in sweep.SETTINGS
]


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sweep.Worker]:
    """One worker subprocess for the module (restarted by itself after a crash)."""
    with sweep.Worker(Path(tmp_path_factory.mktemp("sweep"))) as running:
        yield running


def test_registries_are_swept() -> None:
    everything = sweep.cases()
    assert Case("causal-lm", "llama") in everything
    for registry in sweep.REGISTRIES:
        assert any(case.registry == registry for case in everything), registry
    for case in FAST:
        assert case in everything, case.id
        assert sweep.model_class(case).__name__, case.id


@pytest.mark.parametrize(("case", "setting"), RUNS)
def test_case_is_equal_beyond_or_refused(worker: sweep.Worker, case: Case, setting: str) -> None:
    outcome = worker.run(case, setting)
    if outcome.status == "unbuildable":
        if EVERY:
            pytest.skip(f"transformers cannot build or run it tiny: {outcome.detail}")
        pytest.fail(f"the fast subset must be buildable: {outcome.detail}")
    assert outcome.status in sweep.ACCEPTED, f"{outcome.status}: {outcome.detail}"


def test_a_hung_case_is_a_crash_and_the_sweep_goes_on(tmp_path: Path) -> None:
    """The isolation: a case that outlives its timeout is a ``crash`` (the worker is
    killed), and the next case runs in a fresh worker."""
    with sweep.Worker(tmp_path, timeout=0.01) as hung:  # less than the worker's imports
        outcome = hung.run(Case("causal-lm", "llama"), "int8")
        assert (outcome.status, outcome.detail) == ("crash", "timeout after 0 s")
        assert hung.proc is None
        hung.timeout = sweep.CASE_TIMEOUT
        assert hung.run(Case("causal-lm", "llama"), "int8").status == "equal"
