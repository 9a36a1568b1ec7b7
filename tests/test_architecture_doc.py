"""The worked example of docs/architecture.md runs as written (in its own interpreter: it registers a name)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).parents[1] / "docs" / "architecture.md"


def test_the_worked_weighting_example_trains() -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 1, "docs/architecture.md should hold exactly one python example"
    code = blocks[0] + "\nfrom mtml.weighting import WEIGHTINGS as W\nassert 'inverse_loss' in W.names()\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "['task_0', 'task_1', 'task_2']"
