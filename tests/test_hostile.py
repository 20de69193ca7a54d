"""Every checkpoint of the hostile corpus (``tests/hostile.py``) goes through
``leanstream.load`` and is refused: the exact exception class, a message naming the
file and the tensor (or config field), no Rust panic, and within a second of CPU time.
A damaged file the load can do without (``generation_config.json``) is a warning that
names it instead, and the load goes on."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import pytest
from hostile import CASES, Case, write_bases

import leanstream

#: CPU seconds (all of this process's threads) a refusal may take; the slowest cases
#: take a few hundredths. CPU time, not wall-clock: another process keeping the cores
#: busy, or a cold page cache (waiting for the disk), does not count.
LIMIT = 1.0


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folders = write_bases(tmp_path_factory.mktemp("hostile-bases"))
    # warm up: the first load of a process imports modeling code (seconds)
    for base in ("llama", "nf4"):
        leanstream.load(folders[base], device="cpu", progress=False)
    return folders


def test_corpus_is_large_and_names_are_unique() -> None:
    assert len(CASES) >= 30
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_checkpoint_is_refused(case: Case, bases: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    expect = case.build(bases, folder)
    if issubclass(expect.error, Warning):
        return _loads_with_a_warning(folder, expect.error, expect.file)
    started = time.process_time()
    try:
        leanstream.load(folder, device="cpu", progress=False)
    except BaseException as caught:  # the exact class is asserted below
        err = caught
    else:
        pytest.fail("loaded without an error")
    elapsed = time.process_time() - started
    message = str(err)
    assert type(err) is expect.error, f"{type(err).__module__}.{type(err).__name__}: {message}"
    assert elapsed < LIMIT, f"took {elapsed:.2f} s of CPU"
    assert "panic" not in message.lower(), message
    assert expect.file in message, message
    if isinstance(err, leanstream.CheckpointError):
        assert err.file is not None and expect.file in err.file, (err.file, message)
    if expect.tensor is not None:
        assert f"{expect.tensor}" in message, message
        if isinstance(err, leanstream.CheckpointError):
            assert err.tensor == expect.tensor, (err.tensor, message)
    if expect.field is not None:
        assert expect.field in message, message
    if expect.verify is not None:
        expect.verify()


def _loads_with_a_warning(folder: Path, category: type[Warning], file: str) -> None:
    """The load goes on and warns once, naming ``file``; the model keeps the generation
    config transformers falls back on (the one made from config.json)."""
    from transformers import GenerationConfig

    started = time.process_time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = leanstream.load(folder, device="cpu", progress=False)
    elapsed = time.process_time() - started
    named = [w for w in caught if file in str(w.message)]
    assert [w.category for w in named] == [category], [str(w.message) for w in caught]
    assert elapsed < LIMIT, f"took {elapsed:.2f} s of CPU"
    fallback = GenerationConfig.from_model_config(model.config)
    assert model.generation_config.to_dict() == fallback.to_dict()
