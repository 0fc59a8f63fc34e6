"""docs/theory.md runs as written, and shows the example's current table."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "theory.md"
FENCE = re.compile(r"```python\n(.*?)```", re.S)


def test_theory_page_runs(capsys):
    blocks = FENCE.findall(DOC.read_text())
    assert len(blocks) >= 8
    # one namespace for all blocks, as a reader's session would be
    namespace = {"__name__": "__docs__"}
    for k, block in enumerate(blocks):
        exec(compile(block, f"docs/theory.md, python block {k + 1}", "exec"), namespace)
    assert namespace["comp"].steps.tolist() == [0, 10, 100]


def test_theory_page_shows_the_example_table():
    text = DOC.read_text()
    assert "Residual order (fitted over eta, eta/2, eta/4)" in text
    assert "Kernel regime:" in text


def test_docstring_examples_run():
    import doctest
    import importlib

    for name in (
        "activations",
        "ensemble",
        "infinite",
        "linearized",
        "predict",
        "taylor",
    ):
        module = importlib.import_module(f"fastntk.theory.{name}")
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, f"fastntk.theory.{name}: {result}"
        assert result.attempted > 0, f"fastntk.theory.{name} has no example"
