"""The Ray backend: same bits as a local run for any worker count, through crashes and restarts.

One real Ray runtime on this machine serves the whole module (4 logical CPUs, so that a shared
2-worker evaluator and a second one fit at once; idle workers use no core). Skipped when Ray is not
installed.
"""

import contextlib
import os
import platform
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import pytest
import torch

from deeplinear import distributed as dist
from deeplinear import es
from deeplinear.data import load_dataset
from deeplinear.nets import DeepLinear
from deeplinear.runs import Run
from deeplinear.train import es as es_train

ray = pytest.importorskip("ray")

SIZES = [64, 32, 32, 10]
# A subprocess's bound: starting a Ray worker on a loaded 2-core runner took 150 s (measured, six
# busy loops), so the bound sits far above the driver's own START_TIMEOUT_S, whose error then
# shows instead of a test timeout that hides the driver's stderr.
PROCESS_LIMIT_S = 600
# batch 256 makes the engine cut 24 members into chunks of 10 (full) or 8 (lowrank) members, so
# two workers do split the local chunks
BASE = {"pop": 24, "batch_size": 256, "steps": 4, "eval_every": 2, "checkpoint_every": 2,
        "eval_n": 300, "table_size": 1 << 16, "max_mb": 1, "sigma": 0.1, "lr": 0.03}


def make_cfg(**changes):
    return es_train.Config(**{**BASE, **changes})


def make_model():
    return DeepLinear(SIZES, generator=torch.Generator().manual_seed(0))


def final_theta(model):
    return es.Layout.of(SIZES).flatten(model)


@pytest.fixture(scope="module")
def runtime():
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False,
                 log_to_driver=False, object_store_memory=128 << 20)
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def data():
    return load_dataset("digits")


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def local_run(data, cfg):
    model = make_model()
    rows = es_train.train(model, data, cfg, progress=False)
    return final_theta(model), rows


def ray_run(data, cfg, **kwargs):
    model = make_model()
    with dist.RayEvaluator(model, data, cfg, **kwargs) as ev:
        rows = es_train.train(model, data, cfg, progress=False, evaluate=ev)
    return final_theta(model), rows, ev


@pytest.fixture(scope="module")
def local_full(data):
    return local_run(data, make_cfg())


def test_partition_covers_pairs_in_order_on_aligned_boundaries():
    assert dist.partition(12, 2) == [range(0, 6), range(6, 12)]
    assert dist.partition(12, 5, align=4) == [range(0, 4), range(4, 8), range(8, 12)]
    assert dist.partition(10, 2, align=4) == [range(0, 4), range(4, 10)]
    for pairs, parts, align in [(250, 7, 1), (250, 3, 29), (1, 4, 1)]:
        ranges = dist.partition(pairs, parts, align)
        assert [i for r in ranges for i in r] == list(range(pairs))
        assert all(r.start % align == 0 and len(r) for r in ranges)
    with pytest.raises(ValueError, match="pairs, parts and align"):
        dist.partition(0, 2)


@pytest.fixture(scope="module")
def ev2(runtime, data):
    """Two workers for the base config, shared: a worker's start costs a second or two here."""
    with dist.RayEvaluator(make_model(), data, make_cfg(), workers=2) as ev:
        yield ev


def test_full_rank_run_is_bit_identical_to_local_with_1_or_2_workers(runtime, data, local_full,
                                                                      ev2):
    theta1, rows1, ev1 = ray_run(data, make_cfg(), workers=1)
    assert ev1.stats.generations == BASE["steps"] and ev1.stats.restarts == 0
    model = make_model()
    rows2 = es_train.train(model, data, make_cfg(), progress=False, evaluate=ev2)
    assert torch.equal(theta1, local_full[0]) and torch.equal(final_theta(model), local_full[0])
    assert not torch.equal(theta1, final_theta(make_model()))  # training moved it
    accs = [r["test_acc"] for r in local_full[1]]
    assert [r["test_acc"] for r in rows1] == [r["test_acc"] for r in rows2] == accs


def test_lowrank_run_equals_local_with_the_workers_thread_count(runtime, data, restore_threads):
    cfg = make_cfg(perturbation="lowrank", rank=2, threads=1)
    ref, _ = local_run(data, cfg)
    theta, _, ev = ray_run(data, cfg, workers=2)
    assert ev.align == 4  # cut only at the local engine's chunks of 8 members
    assert torch.equal(theta, ref)


def test_workers_killed_mid_generation_are_replaced_and_change_nothing(data, local_full, ev2,
                                                                       monkeypatch):
    """Generation 1: SIGKILL the last worker's process right after it got its members;
    generation 2: the same through ``ray.kill``."""
    pid = ev2.info()[-1]["pid"]
    submit, restarts = ev2._submit, ev2.stats.restarts

    def submit_then_kill(i, pop, *args):
        ref = submit(i, pop, *args)
        if i == len(ev2.actors) - 1 and pop.generation in (1, 2) and \
                ev2.stats.restarts - restarts < pop.generation:
            if pop.generation == 1:
                os.kill(pid, signal.SIGKILL)
            else:
                ray.kill(ev2.actors[i])
        return ref

    monkeypatch.setattr(ev2, "_submit", submit_then_kill)
    model = make_model()
    es_train.train(model, data, make_cfg(), progress=False, evaluate=ev2)
    assert ev2.stats.restarts - restarts == 2
    assert torch.equal(final_theta(model), local_full[0])


def test_a_worker_that_raises_is_reported_in_one_line_without_retry(data, ev2):
    cfg = make_cfg()
    s = cfg.strategy(es.Layout.of(SIZES))
    pop = es.ask(s, es.init(s, final_theta(make_model())))
    restarts = ev2.stats.restarts
    bad = torch.full((cfg.batch_size,), 10**6)
    with pytest.raises(dist.WorkerError, match=r"IndexError: index 1000000 is out of bounds") \
            as err:
        ev2(pop, bad)
    assert "\n" not in str(err.value) and ev2.stats.restarts == restarts
    loss, acc = ev2(pop, torch.arange(cfg.batch_size))  # the workers are still fine
    assert loss.shape == acc.shape == (cfg.pop,) and torch.isfinite(loss).all()


def test_a_worker_that_never_answers_times_out_after_its_retries(runtime, data):
    cfg = make_cfg(pop=200, batch_size=1000)  # ~20 ms of work against a 1 ms timeout
    model = make_model()
    s = cfg.strategy(es.Layout.of(SIZES))
    pop = es.ask(s, es.init(s, final_theta(model)))
    t0 = time.perf_counter()
    with (dist.RayEvaluator(model, data, cfg, workers=1, timeout_s=1e-3, max_retries=1) as ev,
          pytest.raises(TimeoutError, match=r"worker 0 gave up on generation 0 after 2 tries: "
                                            r"no answer within 0\.001 s")):
        ev(pop, torch.arange(cfg.batch_size))
    # it gives up instead of hanging; the bound allows two actor starts on a loaded machine
    assert ev.stats.restarts == 1 and time.perf_counter() - t0 < PROCESS_LIMIT_S


DRIVER = """
import os, signal, sys, torch
from dataclasses import asdict
from deeplinear import distributed
from deeplinear.data import load_dataset
from deeplinear.nets import DeepLinear
from deeplinear.runs import Run
from deeplinear.train.es import Config, train

class DieAt5(distributed.RayEvaluator):  # the driver's own death, mid-generation 5
    def _submit(self, i, pop, *args):
        ref = super()._submit(i, pop, *args)
        if pop.generation == 5:
            os.kill(os.getpid(), signal.SIGKILL)
        return ref

cfg = Config(**{cfg})
model = DeepLinear({sizes}, generator=torch.Generator().manual_seed(0))
data = load_dataset("digits")
with DieAt5(model, data, cfg, workers=1, address=sys.argv[2]) as ev:
    train(model, data, cfg, Run.open(sys.argv[1], asdict(cfg)), progress=False, evaluate=ev)
"""


def test_a_killed_driver_resumes_from_its_checkpoint_to_the_same_result(runtime, data, tmp_path,
                                                                         ev2):
    """A real driver process on the shared runtime SIGKILLs itself in generation 5; the run
    resumes from its generation-4 checkpoint and ends as the uninterrupted local run."""
    cfg = make_cfg(steps=8, checkpoint_every=2, eval_every=2)
    out = tmp_path / "run"
    code = DRIVER.format(cfg=asdict(cfg), sizes=SIZES)
    try:
        driver = subprocess.run([sys.executable, "-c", code, str(out), runtime],
                                capture_output=True, text=True, timeout=PROCESS_LIMIT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the driver did not finish in {PROCESS_LIMIT_S} s: {e.stderr!s:.2000}")
    assert driver.returncode == -signal.SIGKILL, driver.stderr[-2000:]
    run = Run.open(out, asdict(cfg), resume=True)
    assert run.resumed_state["step"] == 4
    model = make_model()
    es_train.train(model, data, cfg, run, progress=False, evaluate=ev2)  # same strategy
    ref, rows = local_run(data, cfg)
    assert torch.equal(final_theta(model), ref)
    assert [r["test_acc"] for r in run.metrics()] == [r["test_acc"] for r in rows]


def test_cli_ray_backend_writes_the_same_final_weights_as_local(runtime, tmp_path, capsys):
    from deeplinear.cli import main

    common = ["train", "--method", "es", "--dataset", "digits", "--sizes", "64,32,32,10",
              "--steps", "4", "--pop", "24", "--batch-size", "256", "--eval-every", "2",
              "--eval-n", "300", "--n-test", "100", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "local")]) == 0
    assert main([*common, "--out", str(tmp_path / "ray"), "--backend", "ray",
                 "--ray-address", runtime, "--workers", "2"]) == 0
    local, remote = (torch.load(tmp_path / d / "final.pt", weights_only=False)["state_dict"]
                     for d in ("local", "ray"))
    assert local.keys() == remote.keys()
    assert all(torch.equal(local[k], remote[k]) for k in local)
    assert main([*common, "--out", str(tmp_path / "bad"), "--workers", "2"]) == 2
    assert "--workers and --ray-address need --backend ray" in capsys.readouterr().err


def test_a_terminal_ctrl_c_under_ray_stops_with_a_checkpoint_that_resumes(tmp_path,
                                                                           restore_threads):
    """Ctrl-C in a terminal reaches the whole process group: the driver and the Ray processes it
    started. The driver still finishes its generation and checkpoints; resumed locally, the run
    ends as an unbroken local one bit for bit."""
    from deeplinear.cli import main

    torch.set_num_threads(1)  # as the subprocess: a tiny net gains nothing from threads
    args = ["train", "--method", "es", "--dataset", "digits", "--sizes", "64,32,32,10",
            "--steps", "200", "--pop", "24", "--batch-size", "256", "--eval-every", "2",
            "--checkpoint-every", "1000", "--eval-n", "300", "--n-test", "100", "--quiet"]
    stopped = tmp_path / "stopped"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(  # its own process group, SIGINT not ignored, as from a terminal
        [sys.executable, "-m", "deeplinear", *args, "--out", str(stopped), "--backend", "ray",
         "--workers", "2"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline, metrics = time.monotonic() + PROCESS_LIMIT_S, stopped / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text()):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, f"no metrics after {PROCESS_LIMIT_S} s"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGINT)
        err = proc.communicate(timeout=PROCESS_LIMIT_S)[1]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-2000:]
    assert f"continue with deeplinear train --out {stopped} --resume" in err, err[-2000:]
    assert not (stopped / "final.pt").exists(), "the run finished before the Ctrl-C"
    assert main([*args, "--out", str(stopped), "--resume"]) == 0
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    a, b = (torch.load(tmp_path / d / "final.pt", weights_only=False)["state_dict"]
            for d in ("stopped", "whole"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unreachable_address_fails_fast_in_one_line(data):
    t0 = time.perf_counter()
    with pytest.raises(ConnectionError, match=r"cannot reach a Ray cluster at 127\.0\.0\.1:1"):
        dist.RayEvaluator(make_model(), data, make_cfg(), address="127.0.0.1:1")
    assert time.perf_counter() - t0 < 10
    with pytest.raises(ValueError, match="bad Ray address 'localhost': use auto or HOST:PORT"):
        dist.connect("localhost")


def test_a_worker_with_other_versions_is_refused(ev2, monkeypatch):
    mine = dist.versions()
    monkeypatch.setattr(dist, "versions", lambda: {**mine, "torch": "0.0"})  # the driver's view
    with pytest.raises(dist.DistributedError, match=re.escape(
            f"worker 0 on {platform.node()} runs torch {mine['torch']} but the driver runs 0.0")):
        ev2._check_workers()


def test_joining_with_another_ray_version_is_one_line(runtime):
    code = ("import sys, ray\n"
            "ray.__version__ = '0.0.1'\n"
            "from deeplinear.distributed import connect\n"
            "try:\n"
            "    connect(sys.argv[1])\n"
            "except Exception as e:\n"
            "    print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", code, runtime], capture_output=True, text=True,
                         timeout=PROCESS_LIMIT_S).stdout.strip()  # inherits RAY_AUTH_MODE
    assert out.startswith(f"DistributedError cannot join Ray at {runtime}: Version mismatch: "
                          f"The cluster was started with: Ray: {ray.__version__} "), out
    assert "Ray: 0.0.1" in out and "\n" not in out


def test_more_workers_than_cpus_is_refused_before_starting_any(runtime, data):
    with pytest.raises(ValueError, match="need 6 CPUs but the Ray cluster has 4; use --workers 2"):
        dist.RayEvaluator(make_model(), data, make_cfg(), workers=3, threads=2)


@pytest.mark.parametrize("kwargs, match", [
    ({"threads": 0}, "--threads must be >= 1, got 0"), ({"workers": 0}, "--workers must be >= 1"),
    ({"timeout_s": 0.0}, "timeout_s must be > 0"),
    ({"max_retries": -1}, "max_retries must be >= 0"),
])
def test_bad_evaluator_arguments_are_refused_before_ray_starts(data, kwargs, match):
    """``threads=0`` too: it used to fall through to the config's thread count."""
    with pytest.raises(ValueError, match=match):
        dist.RayEvaluator(make_model(), data, make_cfg(threads=2), **kwargs)


def test_missing_ray_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(dist.DistributedError, match=r"^Ray is not installed: pip install "
                                                    r"'deeplinear\[ray\]'$"):
        dist.require_ray()


def test_a_population_from_another_strategy_is_refused(ev2):
    other = make_cfg(sigma=0.2).strategy(es.Layout.of(SIZES))
    pop = es.ask(other, es.init(other, final_theta(make_model())))
    with pytest.raises(ValueError, match="another strategy"):
        ev2(pop, torch.arange(10))


def test_the_ray_backend_refuses_a_gpu_device(data, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="workers' CPUs, not on cuda; drop --device"):
        dist.RayEvaluator(make_model(), data, make_cfg(device="cuda"))
