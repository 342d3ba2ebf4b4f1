"""Every dataset deeplinear trains on, as float32 torch tensors.

Why this module exists: the claim under test is that a *linear* network computes something
nonlinear, so the synthetic tasks here are ones no affine map can solve (a logistic regression
stays near chance), and the image sets are the usual MNIST-format benchmarks. Everything is
deterministic for a seed, so a run can be resumed or reproduced bit for bit.

MNIST-format files are looked up, in order, in a directory the user names, in the Debian package
directory (``dataset-fashion-mnist`` ships ``/usr/share/datasets/fashion-mnist/``), in the cache
(``$DEEPLINEAR_CACHE`` or ``~/.cache/deeplinear``, one subdirectory per dataset), and finally
downloaded into the cache from public mirrors (or ``$DEEPLINEAR_MIRROR``) with MD5 verification,
retries and resume. Only the stdlib's urllib touches the network. Every failure is a
:class:`DataError` whose one-line message names the file and says how to fix it.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import math
import os
import sys
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from deeplinear.arithmetic import integer

NUMPY_SEEDS = 2**32  # numpy's RandomState takes seeds in [0, 2**32): scikit-learn's split, CMA-ES


class DataError(ValueError):
    """A dataset is missing, corrupt or misnamed; the message says which file and what to do."""


def labels_outside(y: Tensor, n_classes: int) -> tuple[int, int] | None:
    """``(min, max)`` of the labels ``y`` when one is no class in ``0..n_classes - 1``, else None
    (no labels: None)."""
    if y.numel() == 0:
        return None
    lo, hi = int(y.min()), int(y.max())
    return (lo, hi) if lo < 0 or hi >= n_classes else None


def check_labels(y: Tensor, n_out: int, values: bool = True) -> None:
    """One-line errors for labels no loss or accuracy can use: not integer class indices (float
    labels compare to an argmax and score a number without meaning) or, with ``values``, a class
    beyond the model's ``n_out`` outputs (an accuracy counts it wrong forever, a loss fails deep
    inside; reading the values waits for a GPU, so a hot loop on one skips it)."""
    if not isinstance(y, Tensor):
        raise ValueError(f"labels must be a torch tensor, got {type(y).__name__}; pass "
                         "torch.as_tensor(y)")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ValueError(f"labels are {y.dtype}; pass integer class indices (y.long())")
    if values and (span := labels_outside(y, n_out)) is not None:
        raise ValueError(f"labels span {span[0]}..{span[1]} but the model has {n_out} outputs "
                         f"(classes 0..{n_out - 1}); pass the labels of its dataset")


@dataclass
class Dataset:
    """A train/test split: ``x`` is float32 (N, D), ``y`` int64 class indices in [0, n_classes)."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    n_classes: int
    shape: tuple[int, ...]  # one sample before flattening, e.g. (28, 28)

    def __post_init__(self) -> None:
        """Refuse, naming the field and the fix, what would fail deep inside a trainer or score
        silently wrong: float64 inputs (the nets run float32), labels of shape (N, 1) (they
        broadcast into an N x N comparison), labels outside the classes, NaN or infinite inputs
        (a trainer would report them as its own divergence), an empty split (a run would fail
        only at its first evaluation)."""
        n_classes = integer(self.n_classes)
        if n_classes is None or n_classes < 2:
            raise DataError(f"{self.name}: n_classes must be an integer >= 2, got "
                            f"{self.n_classes!r}")
        self.n_classes = n_classes
        width = None
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if not isinstance(x, Tensor) or not isinstance(y, Tensor):
                raise DataError(f"{self.name}: x_{split} and y_{split} must be torch tensors, got "
                                f"{type(x).__name__} and {type(y).__name__}")
            if x.dtype != torch.float32 or x.dim() != 2:
                raise DataError(f"{self.name}: x_{split} must be float32 of shape (N, features), "
                                f"got {x.dtype} {tuple(x.shape)}; pass x.float().flatten(1)")
            if len(x) == 0:
                raise DataError(f"{self.name}: x_{split} is empty; every split needs samples")
            if y.dtype != torch.int64 or y.shape != (len(x),):
                raise DataError(f"{self.name}: y_{split} must be int64 of shape ({len(x)},) to "
                                f"match x_{split}, got {y.dtype} {tuple(y.shape)}; pass "
                                "y.long().flatten()")
            if width is not None and x.shape[1] != width:
                raise DataError(f"{self.name}: x_test has {x.shape[1]} features but x_train has "
                                f"{width}; both splits need the same features")
            width = x.shape[1]
            if (span := labels_outside(y, self.n_classes)) is not None:
                raise DataError(f"{self.name}: y_{split} spans {span[0]}..{span[1]}, "
                                f"outside 0..{self.n_classes - 1}; fix the labels or n_classes")
            if not bool(torch.isfinite(x).all()):
                raise DataError(f"{self.name}: x_{split} holds NaN or infinite values; drop or "
                                "impute those rows")

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]

    def fingerprint(self) -> str:
        """BLAKE2b of both splits, rows in order: the same data wherever its files lie (a run
        resumed on another machine or after its data directory moved), ~0.3 s for
        Fashion-MNIST."""
        h = hashlib.blake2b(digest_size=16)
        for t in (self.x_train, self.y_train, self.x_test, self.y_test):
            h.update(t.detach().cpu().contiguous().numpy().data)  # no copy on the CPU
        return h.hexdigest()

    def subset(
        self, n_train: int | None = None, n_test: int | None = None, seed: int = 0
    ) -> Dataset:
        """A seeded random subset, so quick runs see all classes, not just the file's first rows.
        Asked for neither, the set itself (no second copy to check: 237 ms for Fashion-MNIST,
        benchmarks/source_figures.py)."""
        if n_train is None and n_test is None:
            return self
        g = torch.Generator().manual_seed(seed)
        x_train, y_train = _take(self, "train", self.x_train, self.y_train, n_train, g)
        x_test, y_test = _take(self, "test", self.x_test, self.y_test, n_test, g)
        return Dataset(self.name, x_train, y_train, x_test, y_test, self.n_classes, self.shape)


def _take(
    ds: Dataset, split: str, x: Tensor, y: Tensor, n: int | None, g: torch.Generator
) -> tuple[Tensor, Tensor]:
    if n is None:
        return x, y
    if not 0 < n <= len(x):
        raise DataError(f"n_{split}={n} is out of range: {ds.name} has {len(x)} {split} samples; "
                        f"pass --n-{split} between 1 and {len(x)}, or leave it out for all")
    idx = torch.randperm(len(x), generator=g)[:n]
    return x[idx], y[idx]


# --- synthetic tasks -----------------------------------------------------------------------------


def _split(
    name: str, x: Tensor, y: Tensor, *, n_classes: int, test_frac: float, g: torch.Generator
) -> Dataset:
    """Shuffle with ``g`` and cut off ``test_frac`` of the samples as the test set."""
    n_test = round(len(x) * test_frac)
    if not 0 < n_test < len(x):
        raise DataError(
            f"{name}: test_frac={test_frac} of {len(x)} samples leaves an empty split; "
            "use more samples or a test_frac in (0, 1)"
        )
    perm = torch.randperm(len(x), generator=g)
    test, train = perm[:n_test], perm[n_test:]
    x = x.to(torch.float32).contiguous()
    return Dataset(name, x[train], y[train], x[test], y[test], n_classes, tuple(x.shape[1:]))


def _count(name: str, what: str, value: Any, low: int) -> int:
    """``value`` as an int >= ``low``, or a one-line error naming the generator's argument."""
    k = integer(value)
    if k is None or k < low:
        raise DataError(f"{name}: {what}={value!r} must be an integer >= {low}")
    return k


def _balanced_labels(n: int) -> Tensor:
    """Labels 0,1,0,1,...: both classes get n // 2 samples (the first one more when n is odd)."""
    return torch.arange(n) % 2


def spirals(
    n: int = 2000,
    noise: float = 0.05,
    seed: int = 0,
    *,
    turns: float = 2.0,
    test_frac: float = 0.25,
) -> Dataset:
    """Two interleaved spirals in [-1, 1]^2: the classic task a linear classifier cannot do."""
    n = _count("spirals", "n", n, 2)
    g = torch.Generator().manual_seed(seed)
    y = _balanced_labels(n)
    # radius uniform (not area-uniform): dense, tightly wound centre, and outer arm tips that a line
    # could cut off hold few points, so the best half-plane stays near 60%
    r = torch.rand(n, generator=g) * 0.95 + 0.05
    angle = r * turns * 2 * math.pi + y * math.pi
    x = torch.stack([r * angle.cos(), r * angle.sin()], dim=1)
    x = x + noise * torch.randn(n, 2, generator=g)
    return _split("spirals", x, y, n_classes=2, test_frac=test_frac, g=g)


def rings(n: int = 2000, seed: int = 0, *, noise: float = 0.05, test_frac: float = 0.25) -> Dataset:
    """Two concentric rings (radii 0.7 and 1.0): the best half-plane gets ~61% right."""
    n = _count("rings", "n", n, 2)
    g = torch.Generator().manual_seed(seed)
    y = _balanced_labels(n)
    radius = 0.7 + 0.3 * y
    angle = torch.rand(n, generator=g) * 2 * math.pi
    x = radius[:, None] * torch.stack([angle.cos(), angle.sin()], dim=1)
    x = x + noise * torch.randn(n, 2, generator=g)
    return _split("rings", x, y, n_classes=2, test_frac=test_frac, g=g)


def checkerboard(
    n: int = 2000, seed: int = 0, *, cells: int = 4, test_frac: float = 0.25
) -> Dataset:
    """A ``cells`` x ``cells`` checkerboard on [-1, 1]^2 (cells=2 is XOR: a line gets 67% of it)."""
    n, cells = _count("checkerboard", "n", n, 2), _count("checkerboard", "cells", cells, 1)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g) * 2 - 1
    cell = ((x + 1) / 2 * cells).floor().clamp(max=cells - 1).long()
    y = (cell[:, 0] + cell[:, 1]) % 2
    return _split("checkerboard", x, y, n_classes=2, test_frac=test_frac, g=g)


def parity(
    bits: int = 8, seed: int = 0, *, n: int | None = None, test_frac: float = 0.25
) -> Dataset:
    """``bits``-bit vectors in {0, 1}, label = parity: every input bit flips the answer.

    ``n=None`` takes all 2**bits vectors; otherwise ``n`` distinct ones are drawn, so no test vector
    also appears in the training set.
    """
    bits = _count("parity", "bits", bits, 1)
    n = None if n is None else _count("parity", "n", n, 1)
    if bits > 62:
        raise DataError(f"parity: bits={bits} is out of range; use 1..62")
    g = torch.Generator().manual_seed(seed)
    if n is None:
        if bits > 20:
            raise DataError(f"parity: 2**{bits} vectors is too many; pass n to sample some")
        codes = torch.arange(2**bits)
    else:
        if not 0 < n <= 2**bits:
            raise DataError(f"parity: n={n} is out of range; {bits} bits give {2**bits} vectors")
        codes = torch.empty(0, dtype=torch.int64)
        while len(codes) < n:
            draw = torch.randint(0, 2**bits, (n,), generator=g)
            codes = torch.unique(torch.cat([codes, draw]))
        codes = codes[torch.randperm(len(codes), generator=g)[:n]]
    x = (codes[:, None] >> torch.arange(bits)) & 1
    y = x.sum(dim=1) % 2
    return _split("parity", x, y, n_classes=2, test_frac=test_frac, g=g)


def digits(seed: int = 0, *, test_frac: float = 0.25) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images, no download), stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        (x / 16).astype(np.float32), y, test_size=test_frac, random_state=seed, stratify=y
    )
    return Dataset(
        "digits",
        torch.from_numpy(x_train),
        torch.from_numpy(y_train).long(),
        torch.from_numpy(x_test),
        torch.from_numpy(y_test).long(),
        10,
        (8, 8),
    )


# --- IDX files -----------------------------------------------------------------------------------

# IDX type code -> big-endian element type (http://yann.lecun.com/exdb/mnist/, "IDX FILE FORMAT")
_IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when they start with the gzip magic (whatever the name says)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; check the path or download it again") from None
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(
            f"{path}: corrupt or truncated gzip data ({e}); delete it and fetch it again"
        ) from None


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (plain or gzipped) into an array of its shape, in native byte order."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(f"{path}: truncated IDX file ({len(raw)} bytes); fetch it again")
    if raw[:2] != b"\0\0" or raw[2] not in _IDX_TYPES:
        raise DataError(
            f"{path}: not an IDX file (magic 0x{raw[:4].hex()}, expected 0x0000TTNN with type TT "
            f"in {sorted(_IDX_TYPES)}); pass the MNIST-format *-ubyte[.gz] files"
        )
    dtype, ndim = _IDX_TYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes); fetch the file again")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = math.prod(shape) * dtype.itemsize
    got = len(raw) - header
    if got < expected:
        raise DataError(
            f"{path}: truncated IDX file ({got} data bytes, header {shape} needs {expected}); "
            "delete it and fetch it again"
        )
    if got > expected:
        raise DataError(
            f"{path}: {got - expected} trailing bytes after the IDX data (header {shape}); "
            "the file is corrupt or not IDX, replace it"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


# the four files of an MNIST-format dataset: train images, train labels, test images, test labels
IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def _find_idx_files(directory: Path) -> tuple[list[Path], list[str]]:
    """Each IDX file in ``directory`` under its .gz or un-gzipped name, and the names not found."""
    found, missing = [], []
    for gz in IDX_FILES:
        candidates = [directory / gz, directory / gz.removesuffix(".gz")]
        hit = next((p for p in candidates if p.is_file()), None)
        if hit is None:
            missing.append(gz)
        else:
            found.append(hit)
    return found, missing


def load_idx_dataset(
    directory: str | os.PathLike[str], name: str = "idx", n_classes: int = 10
) -> Dataset:
    """Load the four MNIST-format files in ``directory`` (.gz or plain), pixels scaled to [0, 1]."""
    directory = Path(directory)
    files, missing = _find_idx_files(directory)
    if missing:
        raise DataError(
            f"{directory}: missing {', '.join(missing)} (gzipped or not); "
            "put the four MNIST-format IDX files there"
        )
    arrays = [read_idx(p) for p in files]
    splits = []
    for (img_path, images), (lab_path, labels) in [
        ((files[0], arrays[0]), (files[1], arrays[1])),
        ((files[2], arrays[2]), (files[3], arrays[3])),
    ]:
        if images.dtype != np.uint8 or images.ndim < 2:
            raise DataError(
                f"{img_path}: expected uint8 images of shape (N, ...), got {images.dtype} "
                f"{images.shape}; pass the *-images-* file here"
            )
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(
                f"{lab_path}: expected integer labels of shape (N,), got {labels.dtype} "
                f"{labels.shape}; pass the *-labels-* file here"
            )
        if len(images) != len(labels):
            raise DataError(
                f"{img_path} has {len(images)} images but {lab_path.name} has {len(labels)} "
                "labels; the files come from different datasets, replace them with a matching set"
            )
        if len(images) == 0:  # (the Dataset refuses an empty split too, without the file)
            raise DataError(f"{img_path}: holds 0 images; the file is cut short at its source or "
                            "not the full set, replace it")
        if labels.min() < 0 or labels.max() >= n_classes:
            raise DataError(
                f"{lab_path}: labels span {labels.min()}..{labels.max()}, outside "
                f"0..{n_classes - 1}; the file is corrupt or not a label file, replace it"
            )
        x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / np.float32(255))
        splits.append((x, torch.from_numpy(labels.astype(np.int64))))
    if arrays[0].shape[1:] != arrays[2].shape[1:]:
        raise DataError(
            f"{files[2]}: images are {arrays[2].shape[1:]} but training images are "
            f"{arrays[0].shape[1:]}; replace the files with a matching set"
        )
    (x_train, y_train), (x_test, y_test) = splits
    return Dataset(name, x_train, y_train, x_test, y_test, n_classes, tuple(arrays[0].shape[1:]))


# --- MNIST-like datasets: where to find them, how to fetch them ----------------------------------


@dataclass(frozen=True)
class MnistLike:
    """Where one MNIST-format dataset lives: mirrors tried in order, and each .gz file's MD5."""

    mirrors: tuple[str, ...]
    md5: tuple[tuple[str, str], ...]  # (file name, MD5 of the .gz as the mirrors serve it)
    system_dir: str | None = None  # a distribution package's copy (maybe re-gzipped: not checked)
    # How many test images each class has in the published set: re-gzipped copies (Debian's)
    # escape the MD5s, but not their labels' counts.
    test_counts: tuple[int, ...] = (1000,) * 10
    # MD5 of the test labels themselves (the label bytes after the IDX header), which no
    # re-gzipping changes: tells apart sets whose counts are alike (Fashion-MNIST and KMNIST).
    test_labels_md5: str | None = None


def _md5s(*checksums: str) -> tuple[tuple[str, str], ...]:
    return tuple(zip(IDX_FILES, checksums, strict=True))


# The single source of truth for the image datasets (MD5s as in torchvision).
MNIST_LIKE: dict[str, MnistLike] = {
    "mnist": MnistLike(
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
        md5=_md5s(
            "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "d53e105ee54ea40749a09fcbcd1e9432",
            "9fb629c4189551a2d022fa330f9573f3",
            "ec29112dd5afa0611ce80d1b7f02629c",
        ),
        test_counts=(980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
    ),
    "fashion-mnist": MnistLike(
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        md5=_md5s(
            "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "25c81989df183df01b3e8a0aad5dffbe",
            "bef4ecab320f06d8554ea6380940ec79",
            "bb300cfdad3c16e7a12e480ee83cd310",
        ),
        system_dir="/usr/share/datasets/fashion-mnist",  # Debian's dataset-fashion-mnist
        test_labels_md5="8dea97a4e78c1bd1b5a6e8efbb870b6e",  # read from Debian's copy
    ),
    "kmnist": MnistLike(
        mirrors=("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
        md5=_md5s(
            "bdb82020997e1d708af4cf47b453dcf7",
            "e144d726b3acfaa3e44228e80efcd344",
            "5c965bf0a639b31b8f53240b1b52f4d7",
            "7320c461ea6c1c855c0b718fb2a4b134",
        ),
    ),
}

# Pauses between download attempts at one mirror; its length + 1 is the number of attempts.
RETRY_DELAYS_S: tuple[float, ...] = (1.0, 4.0)
TIMEOUT_S = 30.0


def cache_root() -> Path:
    """``$DEEPLINEAR_CACHE``, else ``~/.cache/deeplinear``; each dataset gets a subdirectory."""
    return Path(os.environ.get("DEEPLINEAR_CACHE") or Path.home() / ".cache" / "deeplinear")


def mirrors_for(source: MnistLike) -> tuple[str, ...]:
    """``$DEEPLINEAR_MIRROR`` (base URLs, comma-separated) if set, else the dataset's own mirrors.

    Why: a local or institutional copy can then serve the files, still checked against the MD5s,
    without editing the table. A missing final slash is added, as the file name is appended.
    """
    urls = [u.strip() for u in os.environ.get("DEEPLINEAR_MIRROR", "").split(",") if u.strip()]
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise DataError(
                f"DEEPLINEAR_MIRROR: {url!r} is not an http(s) URL; set it to base URLs such as "
                "http://host/mnist/, comma-separated"
            )
    return tuple(u if u.endswith("/") else u + "/" for u in urls) or source.mirrors


def _md5sum(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _fetch_once(url: str, part: Path) -> bool:
    """Append the rest of ``url`` to ``part``, asking for a byte range when a prefix is there.

    Returns whether it resumed (kept a prefix). A body shorter than its Content-Length (206: the
    rest of the file) raises and keeps ``part``, so the next attempt resumes: http.client returns
    a cut body without raising.
    """
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "deeplinear"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    # a fresh opener reads the proxy settings of the environment as it is now
    opener = urllib.request.build_opener()
    try:
        response = opener.open(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416:  # the .part is as long as the file or longer: start over
            part.unlink()
        raise
    length = response.headers.get("Content-Length", "")
    expected = int(length) if length.isdigit() else None
    received = 0
    resumed = response.status == 206
    with response, open(part, "ab" if resumed else "wb") as f:
        while chunk := response.read(1 << 20):
            f.write(chunk)
            received += len(chunk)
    if expected is not None and received < expected:
        raise ConnectionError(
            f"transfer truncated: the server closed the connection after {received} of "
            f"{expected} bytes"
        )
    return resumed


_MISMATCH = "checksum mismatch"


def _attempt(url: str, part: Path, md5: str) -> tuple[str, bool] | None:
    """One try: None once ``part`` has the right MD5, else (why not, whether a retry can help).

    A missing file (HTTP 4xx) or a whole file with the wrong MD5 is not worth a retry: that mirror
    would answer the same. A wrong MD5 deletes ``part``, so after a resumed download, whose prefix
    may be the bad part, the retry fetches the whole file.
    """
    try:
        resumed = _fetch_once(url, part)
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}", e.code >= 500 or e.code in (408, 416, 429)
    except (OSError, http.client.HTTPException) as e:  # refused, reset, timeout, truncated
        return str(getattr(e, "reason", e)) or type(e).__name__, True
    got = _md5sum(part)
    if got == md5:
        return None
    part.unlink()
    return f"{_MISMATCH}: MD5 {got}, expected {md5}", resumed


def _from_mirror(url: str, part: Path, md5: str) -> str | None:
    """Up to len(RETRY_DELAYS_S) + 1 tries at ``url``: None once ``part`` is verified, else why not.

    Each failed try says why on stderr, so a slow failure is not a row of identical lines.
    """
    tries = len(RETRY_DELAYS_S) + 1
    for attempt, delay in enumerate((*RETRY_DELAYS_S, None), 1):
        failure = _attempt(url, part, md5)
        if failure is None:
            return None
        reason, retry = failure
        if not retry or delay is None:  # None: the last attempt
            print(f"attempt {attempt}/{tries} for {url} failed: {reason}", file=sys.stderr)
            break
        print(f"attempt {attempt}/{tries} for {url} failed: {reason}; retrying in {delay:g}s",
              file=sys.stderr)
        time.sleep(delay)
    return reason


def fetch(mirrors: tuple[str, ...], dest: Path, md5: str) -> Path:
    """Fetch ``dest.name`` from the first mirror that serves it with the right MD5.

    Bytes go to ``dest.name + '.part'`` (resumed with an HTTP Range request when an attempt or a
    previous run left one) and only a verified file is renamed to ``dest``, so ``dest`` is never
    half-written.
    """
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # e.g. $DEEPLINEAR_CACHE names a file
        raise DataError(f"cannot create the download directory {dest.parent}: {e.strerror}; "
                        "point DEEPLINEAR_CACHE at a writable directory, or pass --data-dir "
                        "with the IDX files") from None
    part = dest.with_name(dest.name + ".part")
    failures = []
    for base in mirrors:
        url = base + dest.name
        print(f"downloading {url} -> {dest}", file=sys.stderr)
        reason = _from_mirror(url, part, md5)
        if reason is None:
            os.replace(part, dest)
            return dest
        failures.append((url, reason))
    if all(reason.startswith(_MISMATCH) for _, reason in failures):
        fix = (
            "the checksum did not match: pass --data-dir with your own IDX files or set "
            "DEEPLINEAR_MIRROR to a mirror of the original files"
        )
    else:
        fix = "pass --data-dir with the IDX files, set DEEPLINEAR_MIRROR, or check your connection"
    details = "; ".join(f"{url}: {reason}" for url, reason in failures)
    raise DataError(f"could not download {dest.name} from any mirror ({details}); {fix}")


def _refuse_another_set(name: str, directory: Path, loaded: Dataset) -> None:
    """Refuse a user's files (loaded as ``loaded``) that are another known set's: a file byte for
    byte another set's published .gz (the MD5s), or test labels that count per class as another
    set's do and not as ``name``'s (MNIST's are uneven, 980 zeros, 1135 ones, ...; Fashion-MNIST's
    and KMNIST's 1000 a class), or that are another set's very labels (their MD5, known for
    Fashion-MNIST), which catches re-gzipped copies such as Debian's. Same 28x28 shape, so nothing
    else would notice: Fashion-MNIST passed as MNIST or KMNIST trained and scored. A user's own
    set (other MD5s, other labels) is left alone; so is KMNIST passed as Fashion-MNIST once
    re-gzipped (its labels' MD5 is not known here)."""
    for path in _find_idx_files(directory)[0]:
        if path.suffix != ".gz":
            continue
        got = _md5sum(path)
        other = next((n for n, s in MNIST_LIKE.items() if (path.name, got) in s.md5), name)
        if other != name:
            raise DataError(f"{path}: this is {other}'s published file, not {name}'s; pass "
                            f"--dataset {other}, or a --data-dir holding {name}'s files")
    counts = tuple(torch.bincount(loaded.y_test, minlength=loaded.n_classes).tolist())
    labels = hashlib.md5(loaded.y_test.to(torch.uint8).numpy().tobytes()).hexdigest()
    sets = MNIST_LIKE.items()
    for what, others in (
            ("labels per class count", [n for n, s in sets if s.test_counts == counts]),
            ("labels are those", [n for n, s in sets if s.test_labels_md5 == labels])):
        if others and name not in others:
            raise DataError(f"{directory}: its test {what} as in {' and '.join(others)}, not as "
                            f"in {name}; pass --dataset {' or --dataset '.join(others)}, or a "
                            f"--data-dir holding {name}'s files")


def load_mnist_like(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
) -> Dataset:
    """Load mnist, fashion-mnist or kmnist from ``data_dir``, the system, the cache or the web.

    ``data_dir`` (the user's own files, .gz or not) is used alone when given. Cached files are
    checked against their MD5; ``cache_dir`` replaces the cache root.
    """
    if name not in MNIST_LIKE:
        raise DataError(
            f"unknown MNIST-like dataset {name!r}; choose one of {', '.join(MNIST_LIKE)}"
        )
    source = MNIST_LIKE[name]
    if data_dir is not None:
        loaded = load_idx_dataset(data_dir, name)
        _refuse_another_set(name, Path(data_dir), loaded)
        return loaded
    if source.system_dir is not None and not _find_idx_files(Path(source.system_dir))[1]:
        return load_idx_dataset(source.system_dir, name)
    cache = (Path(cache_dir) if cache_dir is not None else cache_root()) / name
    for file, md5 in source.md5:
        path = cache / file
        if path.exists():
            got = _md5sum(path)
            if got != md5:
                raise DataError(
                    f"{path}: cached file has MD5 {got}, expected {md5}; delete it to download "
                    f"it again, or pass --data-dir {cache} to use these files unchecked"
                )
        elif download:
            fetch(mirrors_for(source), path, md5)
        else:
            raise DataError(
                f"{path}: not in the cache and downloads are off; pass --data-dir with the IDX "
                "files or allow the download"
            )
    return load_idx_dataset(cache, name)


# --- one entry point -----------------------------------------------------------------------------

SYNTHETIC: dict[str, Callable[..., Dataset]] = {
    "spirals": spirals, "rings": rings, "checkerboard": checkerboard, "parity": parity}
DATASETS: tuple[str, ...] = (*SYNTHETIC, "digits", *MNIST_LIKE)


def check_datasets(names: Sequence[str]) -> None:
    """One line naming the datasets of ``names`` deeplinear does not know (or that there are
    none), with the list to choose from."""
    unknown = [name for name in names if name not in DATASETS]
    if unknown or not names:
        raise DataError(f"unknown dataset {', '.join(map(repr, unknown)) or '(none)'}; choose "
                        f"from {', '.join(DATASETS)}")


def data_dir_for(name: str, data_dir: str | None) -> str | None:
    """``data_dir`` where ``name`` reads IDX files, None for the built-in sets (which refuse
    one): for callers that hand one directory to several datasets."""
    return data_dir if name in MNIST_LIKE else None


def check_data_dir(names: Sequence[str], data_dir: str | os.PathLike[str] | None) -> None:
    """Refuse ``data_dir`` when every one of ``names`` is built in (generated or bundled) rather
    than ignore it, so a user who passes it learns it has no effect."""
    built_in = [n for n in names if n in DATASETS and n not in MNIST_LIKE]
    if data_dir is not None and built_in and len(built_in) == len(names):
        raise DataError(f"data_dir (--data-dir) applies to {', '.join(MNIST_LIKE)}; "
                        f"{', '.join(built_in)} are built in, so drop it")


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    n_train: int | None = None,
    n_test: int | None = None,
) -> Dataset:
    """Any dataset by name; ``n_train``/``n_test`` take a seeded random subset of each split.

    ``data_dir`` is for the MNIST-like sets (see :func:`load_mnist_like`); the generated and
    built-in sets refuse it rather than ignore it, so a user who passes it learns it has no effect.
    """
    check_datasets([name])
    check_data_dir([name], data_dir)
    k = integer(seed)
    if k is None or not 0 <= k < NUMPY_SEEDS:
        raise DataError(f"data seed must be an integer in [0, 2**32) (scikit-learn's range, "
                        f"which splits digits), got {seed!r}")
    seed = k
    if name in SYNTHETIC:
        ds = SYNTHETIC[name](seed=seed)
    elif name == "digits":
        ds = digits(seed)
    else:
        ds = load_mnist_like(name, data_dir)
    return ds.subset(n_train, n_test, seed)
