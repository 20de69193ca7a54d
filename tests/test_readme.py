"""The README's example runs as written (on the demo checkpoint ``make demo`` writes)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from leanstream.demo import write_demo_checkpoint

# the outcome depends on bitsandbytes' CPU 4-bit kernel (tests/cpu_kernel.py)
pytestmark = pytest.mark.cpu_kernel


README = Path(__file__).resolve().parents[1] / "README.md"


def example() -> str:
    """The python block of the README's "## Example" section."""
    section = README.read_text().split("\n## Example\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Example section has one python block"
    return blocks[0]


def test_readme_example_runs_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "build").mkdir()
    write_demo_checkpoint(tmp_path / "build" / "demo-model")
    namespace: dict[str, object] = {}
    exec(compile(example(), str(README), "exec"), namespace)
    model = namespace["model"]
    assert model.is_loaded_in_4bit  # type: ignore[attr-defined]
    assert (tmp_path / "build" / "demo-model-nf4" / "config.json").is_file()
    assert "nf4" in capsys.readouterr().out
