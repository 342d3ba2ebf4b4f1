"""README's Python snippets run as written: they are the first code a user copies."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_its_snippets():
    assert len(SNIPPETS) == 3  # quick start, training, the float facts as functions


@pytest.mark.parametrize("code", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_readme_snippet_runs(code, tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)  # where a snippet's files (collapse.png) go
    threads = torch.get_num_threads()  # a Config(threads=1) sets torch's for the process
    try:
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    finally:
        torch.set_num_threads(threads)
