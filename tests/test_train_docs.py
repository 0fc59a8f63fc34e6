"""The training guide runs: every Python block of docs/training.md, in order."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"```python\n(.*?)```", re.S)


def test_training_guide_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = FENCE.findall((ROOT / "docs" / "training.md").read_text())
    assert len(blocks) >= 5
    namespace = {"__name__": "__docs__"}
    for k, block in enumerate(blocks):
        exec(
            compile(block, f"docs/training.md, python block {k + 1}", "exec"), namespace
        )
    assert namespace["hist"].step.tolist() == [0, 50, 100, 150, 200, 250, 300]
    assert namespace["hist_sgd"].step[-1] == 140
    assert namespace["drift"]["wide"] < namespace["drift"]["narrow"]
