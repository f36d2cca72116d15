"""Every ```python block of README.md runs as written (each in a fresh interpreter)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
# a fenced block opened by ```python at the start of a line, up to the closing fence
_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(first line number, source)`` of every ```python block in ``text``."""
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in _BLOCK.finditer(text)]


BLOCKS = python_blocks(README.read_text())


def test_readme_has_python_blocks():
    """The extraction finds the README's examples (a changed fence style would skip them all)."""
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("line,source", [pytest.param(n, src, id=f"README.md:{n}") for n, src in BLOCKS])
def test_readme_python_block_runs(line, source, tmp_path):
    """The block runs in a new process, in an empty directory, within a short timeout."""
    script = tmp_path / f"readme_{line}.py"
    script.write_text(source)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, f"README.md line {line} fails as written:\n{proc.stderr[-3000:]}"
