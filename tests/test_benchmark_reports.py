"""The benchmark scripts' reports record how busy the machine was (``peers.py``,
``time_to_accuracy.py``): "a quiet machine" is a measured load average, start and end."""

import json

from helpers import load_benchmark


def test_peers_nets_are_the_benchmarks_nets():
    """peers.py spells deeplinear.bench.NETS as text (it imports no torch): the same widths."""
    from deeplinear.bench import NETS

    peers = load_benchmark("peers")
    assert {name: tuple(map(int, text.split(","))) for name, text in peers.NETS.items()} == NETS


def test_peers_records_the_machine_and_its_load(tmp_path, capsys):
    peers = load_benchmark("peers")
    out = tmp_path / "peers.json"
    assert peers.main(["--runners", "deeplinear", "--net", "small", "--pop", "4", "--batch", "16",
                       "--gens", "1", "--json", str(out)]) == 0
    machine = json.loads(out.read_text())["machine"]
    assert {"cpu", "cores", "load_avg_1m", "load_avg_1m_end"} <= machine.keys()
    assert "threads" not in machine  # the parent's count, not the runners' (cfg.threads)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("machine: "))
    start, end = machine["load_avg_1m"], machine["load_avg_1m_end"]
    assert line.endswith(f"load average (1 min) at start / end: {start:.2f} / {end:.2f}")


def test_time_to_accuracy_prints_each_run_s_load():
    tta = load_benchmark("time_to_accuracy")
    res = {"task": "spirals", "perturbation": "full", "best_test_acc": 0.95, "total_s": 12.0,
           "reached": {"0.8": {"wall_s": 3.2, "generation": 100}, "0.9": None},
           "machine": {"load_avg_1m": 0.5, "load_avg_1m_end": None}}
    assert tta.table([res]).splitlines()[-1].endswith(
        "best 0.950 in 12 s (load average 0.50 -> -)")
