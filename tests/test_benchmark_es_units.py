"""``benchmarks/es_units.py``: its ``es-readout`` method, whose figures the README reports.

On generated Fashion-MNIST-shaped IDX files (28x28, a few hundred images), so nothing downloads.
"""


import pytest
import torch
import torch.nn.functional as F
from helpers import load_benchmark
from test_data import make_arrays, make_idx_dir

from deeplinear.cli import main as cli
from deeplinear.data import load_dataset
from deeplinear.runs import load_final, load_model
from deeplinear.train.backprop import calibrate

HIDDEN = ("weights.0", "biases.0", "weights.1", "biases.1")


@pytest.fixture(scope="module")
def es_units():
    return load_benchmark("es_units")


@pytest.fixture(scope="module")
def blind(tmp_path_factory):
    """A float-blind net trained briefly on fake 28x28 data, and that data's directory."""
    root = tmp_path_factory.mktemp("es_units")
    data_dir = make_idx_dir(root / "data", make_arrays(300, 100, side=28))
    run = root / "blind"
    assert cli(["train", "--dataset", "fashion-mnist", "--data-dir", str(data_dir), "--method",
                "backprop", "--steps", "5", "--batch-size", "50", "--out", str(run),
                "--quiet"]) == 0
    return run, data_dir


def run_script(es_units, blind, out, *args):
    run, data_dir = blind
    argv = ["--start", str(run), "--data-dir", str(data_dir), "--threads", "1", "--pop", "4",
            "--batch", "50", "--save", str(out), *args]
    assert es_units.main(argv) == 0
    return load_final(out / argv[argv.index("--methods") + 1])["state_dict"]


def start_net(blind):
    """The script's start: the blind net rescaled to one threshold (its --gain default)."""
    run, data_dir = blind
    net = load_model(run)
    data = load_dataset("fashion-mnist", data_dir=str(data_dir))
    calibrate(net, data.x_train, 1.0, center=False, output=False)
    return net, data


def test_es_readout_moves_the_readout_along_its_exact_gradient(es_units, blind, tmp_path):
    """With only the output layer's blocks listed, ES has nothing to search: one step is Adam's
    first step along the readout's exact gradient on the first minibatch (``-lr * sign`` in the
    normalised coordinates), and the hidden layers stay bit for bit."""
    trained = run_script(es_units, blind, tmp_path, "--methods", "es-readout", "--steps", "1",
                         "--blocks", "weights.2,biases.2")
    net, data = start_net(blind)
    idx = torch.randint(len(data.x_train), (50,), generator=torch.Generator().manual_seed(0))
    F.cross_entropy(net(data.x_train[idx]), data.y_train[idx]).backward()
    for name in HIDDEN:
        assert torch.equal(trained[name], getattr(net, name.split(".")[0])[int(name[-1])])
    assert bool((net.weights[2].grad != 0).any())
    for name, param in (("weights.2", net.weights[2]), ("biases.2", net.biases[2])):
        step, grad = trained[name] - param.detach(), param.grad
        # a bias inside the dead zone has a zero exact derivative and stays where it is
        assert torch.equal(torch.sign(step), -torch.sign(grad))


def test_es_readout_searches_the_hidden_units_by_es(es_units, blind, tmp_path):
    """All blocks listed: the hidden layers move too (their gains and biases, by ES)."""
    trained = run_script(es_units, blind, tmp_path, "--methods", "es-readout", "--steps", "2")
    net, _ = start_net(blind)
    for name in HIDDEN:
        assert not torch.equal(trained[name], getattr(net, name.split(".")[0])[int(name[-1])])
