"""The bench machinery on tiny nets: it runs, reports sane figures, and counts FLOPs right.

No timing is asserted (the CI machine is shared and noisy); only that every figure is a positive
finite number and that the derived ones follow from the measured ones.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace

import pytest
import torch

from deeplinear.bench import (
    BUSY_LOAD,
    BenchConfig,
    executed_flops,
    format_report,
    forward_flops,
    net_sizes,
    peak_memory,
    report_warnings,
    run_bench,
)
from deeplinear.cli import main

TINY = BenchConfig.quick(nets=("6,8,8,4",), pops=(4,), batches=(3,), ftz_pop=4, exact_batch=5,
                         min_time=0.0, repeats=1, peak_n=64)


def test_forward_flops_counts_two_per_weight_per_example():
    assert forward_flops((2, 3, 4), 5) == 2 * 5 * (2 * 3 + 3 * 4)
    # the 2017 net: 784*512 + 512*512 + 512*10 = 668,672 weights -> 134 MFLOP at batch 100
    assert forward_flops(net_sizes("2017"), 100) == 133_734_400


def test_executed_flops_full_rank_is_the_nominal_count():
    assert executed_flops((2, 3, 4), 5, 6, rank=0) == 6 * forward_flops((2, 3, 4), 5)


def test_executed_flops_low_rank_shares_layer_one():
    # x @ W1 once; per pair (x@A)@B.T at layer 1; per member h@W2 and (h@A)@B.T at layer 2
    b, pop, r = 5, 6, 1
    want = 2 * b * 2 * 3 + 3 * 2 * b * r * (2 + 3) + 6 * 2 * b * (3 * 4 + r * (3 + 4))
    assert executed_flops((2, 3, 4), b, pop, r) == want


def test_net_sizes_by_name_or_widths():
    assert net_sizes("small") == (64, 256, 256, 10)
    assert net_sizes("6,8,4") == (6, 8, 4)
    with pytest.raises(ValueError, match=r"net 'big': .*use 2017, small or widths"):
        net_sizes("big")
    with pytest.raises(ValueError, match=r"net '64,0,10': .*width") as e:
        net_sizes("64,0,10")
    assert "separate them" not in str(e.value)
    with pytest.raises(ValueError, match=r"net '2017,small': .*separate them with spaces\)$"):
        net_sizes("2017,small")


@pytest.mark.parametrize(("bad", "match"), [
    ({"pops": (3,)}, "even"), ({"modes": ("dense",)}, "unknown mode"), ({"device": "tpu"}, "tpu"),
    ({"batches": (0,)}, "batch"), ({"nets": ("x",)}, "net 'x'"), ({"threads": 0}, "threads"),
    ({"peak_n": 0}, "peak_n must be >= 1, got 0"), ({"min_time": -1}, "min_time must be >= 0"),
    ({"rank": 0}, "rank must be >= 1, got 0"), ({"pops": ()}, "no pops"), ({"nets": ()}, "no nets"),
    ({"nets": ("8,4",)}, "no hidden layer"),
])
def test_bad_config_is_a_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        BenchConfig(**bad)


def test_peak_memory_sees_a_fresh_allocation():
    # 512 MiB, every page touched: larger than any block an earlier test freed, so the allocator
    # cannot hand back pages that are already resident (a 64 MiB block sometimes was, in CI)
    with peak_memory("cpu") as mem:
        x = torch.ones(128 << 20)
    del x
    if mem["bytes"] is None:
        pytest.skip("no /proc/self/clear_refs here")
    assert mem["bytes"] >= 500 * 2**20


def _positive_finite(d, keys):
    for k in keys:
        assert math.isfinite(d[k]) and d[k] > 0, (k, d[k])


@pytest.mark.parametrize("cfg", [TINY, replace(TINY, nets=("6,8,8,4", "3,5,2"), pops=(2, 4),
                                                 exact_nets=("3,5,2",))])
def test_progress_counts_every_measurement_with_an_eta(cfg):
    logged: list[str] = []
    run_bench(cfg, log=logged.append)
    lines = [line for line in logged if not line.startswith("warning: ")]  # a busy machine's
    steps = [line for line in lines if line.startswith("[")]
    total = len(steps)
    assert lines[0] == "sgemm peak" and len(lines) == total + 1
    for i, line in enumerate(steps, 1):
        assert line.startswith(f"[{i}/{total}, ")
        assert ("s left]" in line) == (i > 1)  # an ETA once one step has been timed


def test_run_bench_reports_every_section():
    r = run_bench(TINY)
    assert r["engine_error"] is None
    assert {"cpu", "cores", "threads", "torch"} <= set(r["machine"])
    _positive_finite(r["peak"], ["gflops"])
    assert len(r["rows"]) == 2  # full and low-rank
    for row in r["rows"]:
        _positive_finite(row, ["s_per_gen", "s_eval", "gens_per_s", "member_evals_per_s",
                               "gflops", "exec_gflops", "frac_of_peak"])
        assert row["frac_of_peak"] == pytest.approx(row["exec_gflops"] / r["peak"]["gflops"])
        assert row["gflop_per_gen"] == pytest.approx(4 * forward_flops((6, 8, 8, 4), 3) / 1e9)
        assert row["gflops"] == pytest.approx(row["gflop_per_gen"] / row["s_eval"])
        assert row["member_evals_per_s"] == pytest.approx(4 / row["s_eval"])
        if sys.platform.startswith("linux"):  # VmHWM is there to read
            assert row["peak_mem_bytes"] is not None and row["peak_mem_bytes"] >= 0
    assert [row["rank"] for row in r["rows"]] == [0, 1]
    for f in r["ftz_share"]:
        _positive_finite(f, ["s_eval_ftz", "s_eval_identity"])  # what the swap removes: tested
        # in test_engine.py::test_every_flush_goes_through_the_engines_rule
    (e,) = r["exact"]
    _positive_finite(e, ["s_exact", "s_scaled", "slowdown"])
    assert e["argmax_agree"] == 1.0  # the two modes compute the same function at init
    text = format_report(r)
    assert "sgemm peak" in text and "GFLOP/s" in text and "FTZ" in text


def test_cli_prints_json(capsys):
    assert main(["bench", "--quick", "--nets", "6,8,4", "--pops", "2", "--batches", "2",
                 "--min-time", "0", "--peak-n", "32", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["settings"]["nets"] == ["6,8,4"] and len(r["rows"]) == 2


def test_cli_bad_input_exits_2(capsys):
    assert main(["bench", "--pops", "3"]) == 2
    assert "even" in capsys.readouterr().err


def test_bench_refuses_tf32_products(capsys):
    """With TF32 on, the GPU's sgemm 'peak' and the engine would both run reduced-precision
    products: not the float32 work the benchmark names, so it refuses before measuring."""
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        assert main(["bench", "--quick", "--nets", "6,8,4", "--min-time", "0"]) == 2
    finally:
        torch.set_float32_matmul_precision("highest")
    assert "precision is 'high'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_report():
    return run_bench(TINY)


def test_a_quiet_report_has_no_warning(tiny_report):
    r = json.loads(json.dumps(tiny_report))
    r["machine"]["load_avg_1m"] = BUSY_LOAD
    for row in r["rows"]:
        row["frac_of_peak"] = 0.9
    assert report_warnings(r) == [] and "warning" not in format_report(r)


def test_a_busy_machine_and_rows_above_the_peak_are_flagged(tiny_report):
    r = json.loads(json.dumps(tiny_report))
    r["machine"]["load_avg_1m"] = 2.35
    r["rows"][1]["frac_of_peak"] = 1.256
    busy, over = report_warnings(r)
    assert busy.startswith("load average 2.35 at the start: other processes share the cores")
    row = r["rows"][1]
    assert over.startswith(f"{row['net']} lowrank pop {row['pop']} batch {row['batch']} ran above")
    text = format_report(r)
    assert f"warning: {busy}" in text and f"warning: {over}" in text


def test_json_and_log_carry_the_warnings(monkeypatch):
    monkeypatch.setattr("deeplinear.bench.os.getloadavg", lambda: (3.0, 3.0, 3.0))
    lines: list[str] = []
    r = run_bench(TINY, log=lines.append)
    assert r["warnings"] and r["warnings"] == report_warnings(r)
    assert lines[-len(r["warnings"]):] == [f"warning: {w}" for w in r["warnings"]]
    assert json.loads(json.dumps(r))["warnings"][0].startswith("load average 3.00 at the start")


def test_sgemm_peak_is_the_best_time_with_the_median_beside_it(monkeypatch):
    from deeplinear import bench

    monkeypatch.setattr(bench, "timeit", lambda *a, **k: bench.Timing([1.0, 2.0, 4.0]))
    p = bench.sgemm_peak("cpu", n=8)
    assert p["gflops"] == 2 * 8**3 / 1.0 / 1e9 and p["gflops_median"] == 2 * 8**3 / 2.0 / 1e9


def test_a_load_just_above_the_busy_level_is_flagged(tiny_report):
    r = json.loads(json.dumps(tiny_report))
    r["machine"]["load_avg_1m"] = BUSY_LOAD + 0.25
    for row in r["rows"]:
        row["frac_of_peak"] = 0.5
    (busy,) = report_warnings(r)
    assert busy.startswith(f"load average {BUSY_LOAD + 0.25:.2f} at the start")


def test_a_target_row_above_the_peak_is_flagged(tiny_report):
    r = json.loads(json.dumps(tiny_report))
    r["machine"]["load_avg_1m"] = 0.0
    for row in r["rows"]:
        row["frac_of_peak"] = 0.5
    full = {**r["rows"][0], "net": "2017", "mode": "full", "pop": 1000, "batch": 100,
            "frac_of_peak": 1.3}
    low = {**full, "mode": "lowrank", "frac_of_peak": 0.5}
    r["targets"] = {"lowrank_over_full": 2.0, "full": full, "lowrank": low}
    (over,) = report_warnings(r)
    assert over.startswith("2017 full pop 1000 batch 100 ran above the sgemm peak")
