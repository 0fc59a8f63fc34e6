"""The documentation runs: README and tour snippets, links, the quickstart."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"```python\n(.*?)```", re.S)


def _python_blocks(name):
    return FENCE.findall((ROOT / name).read_text())


def _run(blocks, where):
    # One namespace for all blocks of a page, as a reader's session would be.
    namespace = {"__name__": "__docs__"}
    for k, block in enumerate(blocks):
        code = compile(block, f"{where}, python block {k + 1}", "exec")
        exec(code, namespace)
    return namespace


def test_tour_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    blocks = _python_blocks("docs/tour.md")
    assert len(blocks) >= 10
    namespace = _run(blocks, "docs/tour.md")
    assert namespace["status"] == 0
    assert "residual ~ lr^" in capsys.readouterr().out


def test_readme_api_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = [b for b in _python_blocks("README.md") if "torch" not in b]
    assert blocks, "README.md has no Python example"
    namespace = _run(blocks, "README.md")
    assert namespace["H"].shape == (200, 200, 10, 10)
    assert namespace["history"].train_loss[-1] < namespace["history"].train_loss[0]


def test_readme_interop_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    blocks = [b for b in _python_blocks("README.md") if "torch" in b]
    assert len(blocks) == 1
    namespace = _run(blocks, "README.md")
    assert (tmp_path / "net.npz").is_file()
    assert namespace["net"].widths == (8, 64, 1)


def test_readme_quickstart_and_sections():
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)```", quick, re.S)[0].strip().splitlines()
    assert commands == [
        'pip install ".[report]" && fastntk run',
        'pip install -e ".[test]" && python -m pytest',
    ]
    for section in ("## Limitations", "## Benchmarks", "## Package layout"):
        assert section in text
    assert "asv run --python=same --quick" in text


def test_docs_links_resolve_and_every_page_is_linked():
    text = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#]+\.md)\)", text)
    for target in targets:
        assert (ROOT / target).is_file(), f"README links to missing {target}"
    linked = {Path(t).name for t in targets}
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages <= linked, f"docs pages not linked from README: {pages - linked}"


def test_docstring_examples_run(tmp_path, monkeypatch):
    # the runnable examples of the command line, data, parameter-file and
    # PyTorch modules (the PyTorch ones are marked to skip: torch is optional)
    import doctest

    import fastntk.cli
    import fastntk.cli.progress
    import fastntk.data
    import fastntk.interop
    import fastntk.model.io

    monkeypatch.chdir(tmp_path)
    modules = (
        fastntk.cli,
        fastntk.cli.progress,
        fastntk.data,
        fastntk.interop,
        fastntk.model.io,
    )
    for module in modules:
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, f"{module.__name__}: {result}"
    assert doctest.testmod(fastntk.data).attempted >= 10
