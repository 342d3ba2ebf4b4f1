"""README's Python snippets run as written, and print what their comments say: they are the first
code a user copies."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _quick_start(ns):
    from deeplinear.collapse import collapse_gap

    tf, ieee = collapse_gap(ns["net"], ns["x"]), collapse_gap(ns["ieee"], ns["x"])
    assert (round(tf.relative, 2), round(tf.argmax_agreement, 2)) == (0.27, 0.97)
    assert f"{ieee.relative:.1e}" == "5.9e-07"
    assert ns["mul"](ns["a"], ns["b"], ns["TF_GPU"]).item() == 0.0


def _float_facts(ns):
    import torch

    assert ns["quantize"](torch.tensor([1.1e-38]), "TF_GPU").item() == 0.0
    assert ns["to_bits"](torch.tensor([0.1]), "bfloat16").item() == 15821
    found = ns["find_counterexamples"]("distributivity", "TF_GPU").summary()
    assert (found["n_found"], found["n_flush_caused"]) == (40238, 17190)
    assert ns["run_with_hardware_ftz"](ns["hardware_ftz_coverage"]) == 1.0


# what each snippet's comments claim, checked on the names it leaves behind (the training
# snippet's accuracy is the reproduction's, checked there)
CLAIMS = {0: _quick_start, 2: _float_facts}


def test_readme_has_its_snippets():
    assert len(SNIPPETS) == 3  # quick start, training, the float facts as functions


@pytest.mark.parametrize("i", range(len(SNIPPETS)),
                         ids=[f"snippet{k}" for k in range(len(SNIPPETS))])
def test_readme_snippet_runs_and_says_what_it_prints(i, tmp_path, monkeypatch):
    import torch

    code = SNIPPETS[i]
    if "run_with_hardware_ftz" in code and not torch.set_flush_denormal(False):
        pytest.skip("this CPU has no FTZ/DAZ to run with (x86 with SSE3 only)")
    monkeypatch.chdir(tmp_path)  # where a snippet's files (collapse.png) go
    threads = torch.get_num_threads()  # a Config(threads=1) sets torch's for the process
    ns = {"__name__": "readme"}
    try:
        exec(compile(code, str(README), "exec"), ns)
        if i in CLAIMS:
            CLAIMS[i](ns)
    finally:
        torch.set_num_threads(threads)
