"""The CUDA paths, run where a GPU is; skipped elsewhere (CI has none, so the device plumbing is
also checked on the ``meta`` device in test_engine). TF32 is off throughout: with it on, float32
products would be rounded to 10-bit inputs and nothing here would be float32 semantics."""

import itertools

import pytest
import torch
from helpers import ENGINE_SIZES, engine_setup, one_by_one
from sklearn.linear_model import LogisticRegression

from deeplinear import arithmetic as ar
from deeplinear import es
from deeplinear.arithmetic import CPU_FTZ_DAZ, IEEE, TF_GPU
from deeplinear.bench import BenchConfig, run_bench
from deeplinear.cli import main
from deeplinear.data import load_dataset
from deeplinear.engine import Engine
from deeplinear.nets import DeepLinear
from deeplinear.train import backprop
from deeplinear.train import es as es_trainer
from deeplinear.train.es import Config, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

SEMANTICS = (TF_GPU, IEEE, CPU_FTZ_DAZ)
SIZES = ENGINE_SIZES


@pytest.fixture(autouse=True)
def float32_matmul():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def bits(t):
    return t.cpu().view(torch.int32)


def near_min(n, lo, hi, seed):
    """float32 values of random sign with exponents uniform in [lo, hi): subnormals, values
    around the smallest normal and normal values, where the semantics differ."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randint(lo, hi, (n,), generator=g).double()
    m = 1 + torch.rand(n, generator=g, dtype=torch.float64)
    sign = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
    return (sign * m * 2.0**e).float()


@pytest.mark.parametrize("sem", SEMANTICS, ids=lambda s: ar.preset_name(s))
@pytest.mark.parametrize("op", ["add", "sub", "mul", "div"])
def test_elementwise_ops_give_the_cpus_bits_on_the_gpu(sem, op):
    """Elementwise float32 ops round correctly on both devices, so each semantics' result,
    flushes included, must be the same bits on the GPU as on the CPU."""
    n = 1 << 16
    if op in ("add", "sub"):
        a, b = near_min(n, -150, -110, 0), near_min(n, -150, -110, 1)
    elif op == "mul":
        a, b = near_min(n, -80, -40, 0), near_min(n, -90, -60, 1)
    else:
        a, b = near_min(n, -140, -100, 0), near_min(n, 0, 30, 1)
    fn = getattr(ar, op)
    on_cpu, on_gpu = fn(a, b, sem), fn(a.cuda(), b.cuda(), sem)
    assert on_gpu.is_cuda
    assert torch.equal(bits(on_gpu), bits(on_cpu))
    subnormal = (on_cpu != 0) & (on_cpu.abs() < torch.finfo(torch.float32).tiny)
    assert bool(subnormal.any()) == (sem is IEEE)  # the flush really acted (or did not)


def test_the_gpu_keeps_subnormals_that_tf_gpu_semantics_flush():
    """Why the emulation is needed on a GPU too: PyTorch's CUDA kernels keep subnormals."""
    a = torch.tensor([2.0**-70], device="cuda")
    assert (a * a).item() == 2.0**-140
    assert ar.mul(a, a, TF_GPU).item() == 0.0


@pytest.mark.parametrize("sem", SEMANTICS, ids=lambda s: ar.preset_name(s))
def test_a_net_computes_on_the_gpu_what_it_computes_on_the_cpu(sem):
    """Same weights, same inputs: the matmul sums round in another order on the GPU, so the
    logits are close rather than equal, and (nearly) every prediction is the same."""
    net = DeepLinear([64, 128, 128, 10], semantics=sem,
                     generator=torch.Generator().manual_seed(0))
    x = torch.randn(2000, 64, generator=torch.Generator().manual_seed(1))
    gpu = DeepLinear([64, 128, 128, 10], semantics=sem)
    gpu.load_state_dict(net.state_dict())
    gpu.cuda()
    for mode in ("exact", "scaled"):
        cpu_out, gpu_out = net(x, mode=mode), gpu(x.cuda(), mode=mode).cpu()
        agree = (cpu_out.argmax(1) == gpu_out.argmax(1)).double().mean().item()
        assert agree > 0.99, (mode, agree)
        scale = cpu_out.abs().max().item()
        torch.testing.assert_close(gpu_out, cpu_out, rtol=1e-3, atol=1e-3 * scale)


@pytest.mark.parametrize("rank", [0, 1], ids=["full", "lowrank"])
@pytest.mark.parametrize("sem", SEMANTICS, ids=lambda s: ar.preset_name(s))
def test_the_engine_on_the_gpu_scores_members_as_the_net_does(sem, rank):
    """Member by member through the net's own scaled forward pass on the GPU. Full rank builds
    each member's weights as the net would; cuBLAS's batched and single products may sum in
    another order, so both modes are compared to rounding and the flush must really act."""
    net, s, pop, x, _ = engine_setup(sem, rank, device="cuda")
    out = Engine(net, s).logits(pop, x)
    assert out.is_cuda
    torch.testing.assert_close(out, one_by_one(net, pop, x), rtol=1e-4, atol=1e-5)
    if sem.flushes:
        assert (out == 0).any() and (out != 0).any()


def test_the_noise_and_the_perturbations_on_the_gpu_are_the_cpus():
    """Drawn on the CPU, multiplied elementwise (correctly rounded on both devices): a GPU run
    perturbs by the very same bits, whether the GPU gathers the pairs' slices at once or not."""
    assert torch.equal(es.noise_table(3, 1 << 16, "cuda").cpu(), es.noise_table(3, 1 << 16))
    layout = es.Layout.of(SIZES)
    theta = torch.randn(layout.n, generator=torch.Generator().manual_seed(0))
    for rank in (0, 1):
        cpu, gpu = [es.ask(s, es.init(s, theta)) for s in (
            es.Strategy(layout, pop=10, sigma=0.3, rank=rank, table_size=1 << 16, device=d)
            for d in ("cpu", "cuda"))]
        for j in range(10):
            assert torch.equal(gpu.member(j).cpu(), cpu.member(j))
        if not rank:
            assert torch.equal(gpu.deltas(range(5)).cpu(), cpu.deltas(range(5)))


@pytest.mark.parametrize("rank", [0, 1], ids=["full", "lowrank"])
def test_the_gradient_on_the_gpu_is_the_cpus_up_to_rounding(rank, monkeypatch):
    """The GPU sums the pairs' noise in gathered chunks (several here), the CPU pair by pair."""
    monkeypatch.setattr(es, "GRADIENT_CHUNK_BYTES", 3 * 4 * es.Layout.of(SIZES).n)
    layout = es.Layout.of(SIZES)
    theta = torch.randn(layout.n, generator=torch.Generator().manual_seed(0))
    losses = torch.rand(20, generator=torch.Generator().manual_seed(1))
    grads = []
    for d in ("cpu", "cuda"):
        s = es.Strategy(layout, pop=20, sigma=0.3, rank=rank, table_size=1 << 16, device=d)
        grads.append(es.gradient(es.ask(s, es.init(s, theta)), losses.to(d)).cpu())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
    assert grads[0].abs().max() > 0


FAST = {"pop": 40, "batch_size": 256, "sigma": 0.03, "lr": 0.03, "table_size": 1 << 16}


@pytest.mark.parametrize("perturbation", ["full", "lowrank"])
def test_es_on_the_gpu_follows_the_cpu_run_and_learns_as_it_does(perturbation):
    """The same batches, noise and ranks as on the CPU: after a few generations the two runs'
    weights differ by rounding only, and after 200 they score alike, far above a linear model."""
    data = load_dataset("rings", seed=0)

    def run(steps, device):
        net = DeepLinear([2, 16, 16, 2], generator=torch.Generator().manual_seed(0)).to(device)
        cfg = Config(steps=steps, eval_every=steps, perturbation=perturbation, device=device,
                     **FAST)
        return net, train(net, data, cfg, progress=False)[-1]["test_acc"]

    (cpu_net, _), (gpu_net, _) = run(3, "cpu"), run(3, "cuda")
    assert gpu_net.weights[0].is_cuda
    for c, g in zip(cpu_net.parameters(), gpu_net.parameters(), strict=True):
        torch.testing.assert_close(g.detach().cpu(), c.detach(), rtol=1e-3, atol=1e-4)
    linear = LogisticRegression().fit(data.x_train.numpy(), data.y_train.numpy())
    linear_acc = linear.score(data.x_test.numpy(), data.y_test.numpy())
    on_cpu, on_gpu = run(200, "cpu")[1], run(200, "cuda")[1]
    assert on_gpu > linear_acc + 0.2
    assert abs(on_gpu - on_cpu) < 0.05


@pytest.mark.parametrize("method", ["float-aware", "backprop", "es"])
def test_cli_on_the_gpu_resumes_bit_identically_and_evaluates_on_the_cpu(tmp_path, method,
                                                                         monkeypatch, capsys):
    """A run stopped (as by Ctrl-C) after step 25 of 40 and resumed on the GPU ends with the same
    weights, bit for bit, as one that ran straight through there; final.pt holds CPU tensors."""
    args = ["train", "--dataset", "rings", "--sizes", "2,16,16,2", "--method", method, "--quiet",
            "--device", "cuda", "--steps", "40", "--eval-every", "20"]
    module = es_trainer if method == "es" else backprop
    calls = itertools.count(1)
    monkeypatch.setattr(module, "stop_asked", lambda: next(calls) == 25)
    assert main([*args, "--out", str(tmp_path / "stopped")]) == 130
    monkeypatch.undo()
    assert main([*args, "--out", str(tmp_path / "stopped"), "--resume"]) == 0
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    a, b = (torch.load(tmp_path / run / "final.pt", weights_only=False)["state_dict"]
            for run in ("stopped", "whole"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(t.is_cuda for t in a.values())
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "whole"), "--resume", "--device", "cpu"]) == 2
    assert 'trainer.device (run: "cuda", now: "cpu")' in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "whole"), "--json"]) == 0


def test_bench_measures_the_engine_on_the_gpu():
    r = run_bench(BenchConfig.quick(device="cuda", nets=("small",), min_time=0.05, repeats=1))
    assert r["engine_error"] is None
    assert r["peak"]["gflops"] > 1000  # any datacenter GPU's float32 sgemm
    assert {row["mode"] for row in r["rows"]} == {"full", "lowrank"}
    assert all(row["gflops"] > 0 and row["peak_mem_bytes"] > 0 for row in r["rows"])


def test_a_gpu_chunk_is_bounded_by_memory_alone():
    """The CPU's cache bound (CHUNK_CACHE_BYTES: 10 members of the 2017 net at batch 100) would
    cut a GPU generation into launch-bound slivers: on CUDA only max_bytes limits a chunk."""
    sizes = [784, 512, 512, 10]
    layout = es.Layout.of(sizes)
    s = es.Strategy(layout, pop=1000, device="cuda")
    budget = 64 * 4 * (layout.n + 100 * sum(sizes[1:]))
    assert Engine(DeepLinear(sizes).cuda(), s, max_bytes=budget).members_per_chunk(100) == 64
