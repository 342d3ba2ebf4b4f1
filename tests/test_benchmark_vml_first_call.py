"""``benchmarks/vml_first_call.py``: the run behind README's figures on MKL's first-call race."""

from helpers import load_benchmark


def test_one_try_reports_the_first_calls_agreement_and_the_torch_version():
    import torch

    vml = load_benchmark("vml_first_call")
    differs, version = vml.first_call_differs("sqrt", "deeplinear")
    assert differs is False and version == torch.__version__  # the kernels picked at import
