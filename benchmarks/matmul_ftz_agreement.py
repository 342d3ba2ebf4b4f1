"""How close ``arithmetic.matmul(a, b, CPU_FTZ_DAZ)`` is to the hardware it is named after.

Why: under scope ``all`` the emulated matmul is a *definition* (read the inputs through DAZ, take
the IEEE product, flush the tiny outputs), while MKL with FTZ+DAZ set also flushes every partial
product and partial sum inside its accumulation, which no elementwise rule can reproduce. This
script measures the consequence on the matrices that matter: the 2017 net's hidden matmuls at
true scale (products ~1e-40, subnormal) and random matrices whose products straddle the smallest
normal, plus a control where every product and result is normal (there the two must agree bit
for bit). The hardware side runs under :func:`run_with_hardware_ftz`, multi-threaded.

    python benchmarks/matmul_ftz_agreement.py            # full size, a few seconds here
    python benchmarks/matmul_ftz_agreement.py --small    # seconds; what the test runs
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from deeplinear import arithmetic as ar
from deeplinear.arithmetic import CPU_FTZ_DAZ, FORMATS, run_with_hardware_ftz
from deeplinear.bench import cpu_model
from deeplinear.data import IDX_FILES, MNIST_LIKE, read_idx
from deeplinear.nets import SIZES_2017, DeepLinear

MIN = FORMATS["float32"].min_normal
BLOG_SIZES = SIZES_2017


@dataclass(frozen=True)
class Agreement:
    """One matmul, emulated vs hardware, entry by entry."""

    case: str
    shape: tuple[int, int, int]  # (m, k, n)
    bit_identical: float  # fraction of output entries with the same float32 bits
    equal: float  # fraction equal as values (+0 == -0)
    same_zero: float  # fraction where both are zero or both nonzero (the flush decisions)
    zero_hardware: float
    zero_emulated: float
    all_normal: bool  # every nonzero product and every nonzero result is normal


def _smallest_nonzero(t: Tensor) -> float:
    nonzero = t.abs()[t != 0]
    return float(nonzero.min()) if nonzero.numel() else math.inf


def measure(case: str, a: Tensor, b: Tensor) -> Agreement:
    emulated = ar.matmul(a, b, CPU_FTZ_DAZ)
    hardware = run_with_hardware_ftz(torch.matmul, a, b)
    ez, hz = emulated == 0, hardware == 0
    products_normal = _smallest_nonzero(a) * _smallest_nonzero(b) >= MIN  # sufficient
    results_normal = _smallest_nonzero(a @ b) >= MIN  # the IEEE results, before any flush
    return Agreement(
        case=case,
        shape=(a.shape[0], a.shape[1], b.shape[1]),
        bit_identical=float((emulated.view(torch.int32) == hardware.view(torch.int32)).double()
                            .mean()),
        equal=float((emulated == hardware).double().mean()),
        same_zero=float((ez == hz).double().mean()),
        zero_hardware=float(hz.double().mean()),
        zero_emulated=float(ez.double().mean()),
        all_normal=products_normal and results_normal,
    )


def blog_inputs(n: int, seed: int) -> tuple[Tensor, str]:
    """``n`` Fashion-MNIST test images in [0, 1] if the system copy exists, else uniform noise."""
    directory = MNIST_LIKE["fashion-mnist"].system_dir
    path = Path(directory) / IDX_FILES[2] if directory else None
    if path is not None and path.exists():
        images = read_idx(path)[:n].reshape(n, -1).astype(np.float32) / 255
        return torch.from_numpy(images), f"Fashion-MNIST test images ({path})"
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, BLOG_SIZES[0], generator=g), "uniform [0, 1] noise"


def cases(small: bool, seed: int) -> tuple[list[tuple[str, Tensor, Tensor]], str]:
    """The matrices to compare, and a line saying where the net's inputs came from."""
    n_images, side = (64, 64) if small else (1000, 512)
    g = torch.Generator().manual_seed(seed)
    net = DeepLinear(BLOG_SIZES, semantics=CPU_FTZ_DAZ, generator=g)
    x, source = blog_inputs(n_images, seed)
    w = [p.detach() for p in net.weights]
    b = [p.detach() for p in net.biases]
    k, sem = net.scale_exp, CPU_FTZ_DAZ
    # the 2017 forward at true scale, every op emulated (what the hardware would be fed)
    h1 = ar.scale(ar.bias_add(ar.matmul(x, w[0], sem), b[0], sem), -k, sem)
    h2 = ar.bias_add(ar.matmul(h1, w[1], sem), ar.scale(b[1], -k, sem), sem)
    half = 2.0**-63  # N(0,1) * 2**-63 twice: products ~ min * N(0,1)**2, half of them subnormal
    return [
        ("2017 net h1 @ W2 (true scale)", h1, w[1]),
        ("2017 net h2 @ W3 (true scale)", h2, w[2]),
        ("random, products near min", torch.randn(side, side, generator=g) * half,
         torch.randn(side, side, generator=g) * half),
        ("control: N(0,1), all normal", torch.randn(side, side, generator=g),
         torch.randn(side, side, generator=g)),
    ], source


def machine() -> str:
    blas = "MKL" if torch.backends.mkl.is_available() else "non-MKL BLAS"
    return f"{cpu_model()}; torch {torch.__version__} ({blas}), {torch.get_num_threads()} threads"


def format_table(rows: list[Agreement]) -> str:
    head = f"{'case':<30} {'m x k x n':>13} {'bit-identical':>13} {'equal':>9} " \
           f"{'same zero/nonzero':>17} {'zero (hw)':>9} {'zero (emu)':>10} {'all normal':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        shape = "x".join(map(str, r.shape))
        lines.append(
            f"{r.case:<30} {shape:>13} {r.bit_identical:>13.4%} {r.equal:>9.4%} "
            f"{r.same_zero:>17.4%} {r.zero_hardware:>9.2%} {r.zero_emulated:>10.2%} "
            f"{r.all_normal!s:>10}"
        )
    return "\n".join(lines)


def run(small: bool = False, seed: int = 0) -> tuple[list[Agreement], str]:
    matrices, source = cases(small, seed)
    rows = [measure(name, a, b) for name, a, b in matrices]
    settings = (
        f"machine: {machine()}\n"
        f"emulated: arithmetic.matmul(a, b, CPU_FTZ_DAZ) in the calling thread (FTZ off); "
        f"hardware: torch.matmul under run_with_hardware_ftz (FTZ+DAZ in every thread)\n"
        f"net: DeepLinear{BLOG_SIZES}, scale 2**-125, He init seed {seed}; inputs: {source}"
    )
    return rows, settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="small sizes (seconds)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows, settings = run(args.small, args.seed)
    print(settings)
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
