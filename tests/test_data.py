"""Datasets: IDX parsing and its errors, synthetic tasks, downloads from a loopback HTTP server.

Nothing here touches the internet: every mirror in the table is pointed at a closed loopback port
unless a test serves the files itself from 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import math
import re
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier

from deeplinear import data
from deeplinear.data import DataError

IMAGES_TRAIN, LABELS_TRAIN, IMAGES_TEST, LABELS_TEST = data.IDX_FILES


# --- helpers -------------------------------------------------------------------------------------

_TYPE_CODES = {"u1": 0x08, "i1": 0x09, "i2": 0x0B, "i4": 0x0C, "f4": 0x0D, "f8": 0x0E}


def idx_bytes(a: np.ndarray) -> bytes:
    """``a`` in IDX format: magic (0, 0, type, ndim), big-endian uint32 dims, big-endian data."""
    header = (
        bytes([0, 0, _TYPE_CODES[a.dtype.str[1:]], a.ndim]) + np.array(a.shape, ">u4").tobytes()
    )
    return header + a.astype(a.dtype.newbyteorder(">")).tobytes()


def write_bytes(path: Path, raw: bytes) -> Path:
    """Write ``raw``, gzipped (reproducibly, mtime 0) when the name ends in .gz."""
    path.write_bytes(gzip.compress(raw, mtime=0) if path.suffix == ".gz" else raw)
    return path


def write_idx(path: Path, a: np.ndarray) -> Path:
    return write_bytes(path, idx_bytes(a))


def make_arrays(n_train: int = 20, n_test: int = 10, seed: int = 0,
                side: int = 4) -> list[np.ndarray]:
    """Tiny side x side 'images' and labels 0..9, in IDX_FILES order."""
    rng = np.random.default_rng(seed)
    return [
        rng.integers(0, 256, (n_train, side, side), dtype=np.uint8),
        rng.integers(0, 10, n_train, dtype=np.uint8),
        rng.integers(0, 256, (n_test, side, side), dtype=np.uint8),
        rng.integers(0, 10, n_test, dtype=np.uint8),
    ]


def make_idx_dir(directory: Path, arrays: list[np.ndarray], gz: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, a in zip(data.IDX_FILES, arrays, strict=True):
        write_idx(directory / (name if gz else name.removesuffix(".gz")), a)
    return directory


def gz_files(arrays: list[np.ndarray]) -> dict[str, bytes]:
    return {
        name: gzip.compress(idx_bytes(a), mtime=0)
        for name, a in zip(data.IDX_FILES, arrays, strict=True)
    }


def md5(raw: bytes) -> str:
    return hashlib.md5(raw).hexdigest()


def use_mirrors(monkeypatch: pytest.MonkeyPatch, mirrors: list[str], files: dict[str, bytes]):
    """Point the table's "mnist" entry at ``mirrors``, with the checksums of ``files``."""
    entry = data.MnistLike(tuple(mirrors), tuple((name, md5(raw)) for name, raw in files.items()))
    monkeypatch.setitem(data.MNIST_LIKE, "mnist", entry)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_one_line_naming(err: pytest.ExceptionInfo[DataError], name: str) -> str:
    msg = str(err.value)
    assert name in msg
    assert "\n" not in msg
    return msg


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test may reach the internet or the user's cache, and retries must not sleep."""
    dead = f"http://127.0.0.1:{closed_port()}/"
    for name, entry in list(data.MNIST_LIKE.items()):
        monkeypatch.setitem(data.MNIST_LIKE, name, dataclasses.replace(entry, mirrors=(dead,)))
    monkeypatch.setenv("DEEPLINEAR_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DEEPLINEAR_MIRROR", raising=False)
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(data, "RETRY_DELAYS_S", ())


class Server(ThreadingHTTPServer):
    files: dict[str, bytes]  # URL path -> body
    requests: list[tuple[str, str | None]]  # (path, Range header)
    honor_range: bool
    cuts: dict[str, int]  # URL path -> how many more responses to cut off after a third


class Handler(BaseHTTPRequestHandler):
    server: Server

    def do_GET(self) -> None:
        rng = self.headers.get("Range")
        self.server.requests.append((self.path, rng))
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        if rng and self.server.honor_range:
            start = int(rng.removeprefix("bytes=").removesuffix("-"))
            if start >= len(body):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        end = len(body)
        if self.server.cuts.get(self.path, 0) > 0:  # a dropped connection: HTTP/1.0 closes it
            self.server.cuts[self.path] -= 1
            end = start + (len(body) - start) // 3
        self.wfile.write(body[start:end])

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server(("127.0.0.1", 0), Handler)
    srv.files, srv.requests, srv.honor_range, srv.cuts = {}, [], True, {}
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join()


def serve(srv: Server, prefix: str, files: dict[str, bytes]) -> str:
    """Serve ``files`` under ``/prefix/`` and return that mirror's base URL."""
    srv.files.update({f"/{prefix}/{name}": raw for name, raw in files.items()})
    return f"http://127.0.0.1:{srv.server_address[1]}/{prefix}/"


# --- IDX -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", ">i4", ">f4", ">f8"])
def test_read_idx_round_trip(tmp_path: Path, suffix: str, dtype: str) -> None:
    a = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    got = data.read_idx(write_idx(tmp_path / f"x-idx3-ubyte{suffix}", a))
    np.testing.assert_array_equal(got, a)
    assert got.dtype.isnative and got.shape == (2, 3, 4)


def test_read_idx_detects_gzip_by_content(tmp_path: Path) -> None:
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(gzip.compress(idx_bytes(np.arange(5, dtype=np.uint8))))
    np.testing.assert_array_equal(data.read_idx(path), np.arange(5))


GOOD = idx_bytes(np.arange(12, dtype=np.uint8).reshape(3, 4))

BAD_IDX = {
    "bad magic": (b"\x12\x34" + GOOD[2:], "not an IDX file"),
    "unsupported type code": (b"\0\0\x07" + GOOD[3:], "not an IDX file"),
    "truncated magic": (GOOD[:3], "truncated"),
    "truncated header": (GOOD[:9], "truncated IDX header"),
    "truncated data": (GOOD[:-1], "truncated IDX file"),
    "trailing bytes": (GOOD + b"\0\0", "2 trailing bytes"),
    "truncated gzip": (gzip.compress(GOOD)[:-6], "truncated gzip"),
}


@pytest.mark.parametrize("case", list(BAD_IDX))
def test_read_idx_errors_name_the_file(tmp_path: Path, case: str) -> None:
    raw, fragment = BAD_IDX[case]
    path = tmp_path / "broken-idx2-ubyte"
    path.write_bytes(raw)
    with pytest.raises(DataError, match=fragment) as err:
        data.read_idx(path)
    assert_one_line_naming(err, str(path))


def test_read_idx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file") as err:
        data.read_idx(tmp_path / "nope.gz")
    assert_one_line_naming(err, "nope.gz")


@pytest.mark.parametrize("gz", [True, False])
def test_load_idx_dataset(tmp_path: Path, gz: bool) -> None:
    arrays = make_arrays()
    ds = data.load_idx_dataset(make_idx_dir(tmp_path, arrays, gz=gz), "tiny")
    assert (ds.name, ds.shape, ds.n_features, ds.n_classes) == ("tiny", (4, 4), 16, 10)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.x_train.shape == (20, 16) and ds.x_test.shape == (10, 16)
    np.testing.assert_allclose(ds.x_train.numpy(), arrays[0].reshape(20, 16) / 255, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_test.numpy(), arrays[3])
    assert ds.x_test.min() >= 0 and ds.x_test.max() <= 1


def test_load_idx_dataset_missing_files(tmp_path: Path) -> None:
    make_idx_dir(tmp_path, make_arrays())
    (tmp_path / LABELS_TEST).unlink()
    with pytest.raises(DataError, match="missing") as err:
        data.load_idx_dataset(tmp_path)
    msg = assert_one_line_naming(err, LABELS_TEST)
    assert str(tmp_path) in msg and IMAGES_TRAIN not in msg


def test_load_idx_dataset_count_mismatch(tmp_path: Path) -> None:
    arrays = make_arrays()
    arrays[1] = arrays[1][:-1]
    make_idx_dir(tmp_path, arrays)
    with pytest.raises(DataError, match=r"20 images but .* 19 labels") as err:
        data.load_idx_dataset(tmp_path)
    assert_one_line_naming(err, LABELS_TRAIN)


@pytest.mark.parametrize("bad", [10, -1])
def test_load_idx_dataset_labels_out_of_range(tmp_path: Path, bad: int) -> None:
    arrays = make_arrays()
    arrays[3] = arrays[3].astype(np.int8)  # IDX type 0x09 can hold a negative label
    arrays[3][4] = bad
    make_idx_dir(tmp_path, arrays)
    with pytest.raises(DataError, match=r"outside 0..9") as err:
        data.load_idx_dataset(tmp_path)
    assert_one_line_naming(err, LABELS_TEST)


def test_load_idx_dataset_rejects_swapped_files(tmp_path: Path) -> None:
    arrays = make_arrays()
    arrays[0], arrays[1] = arrays[1], arrays[0]
    make_idx_dir(tmp_path, arrays)
    with pytest.raises(DataError, match="expected uint8 images") as err:
        data.load_idx_dataset(tmp_path)
    assert_one_line_naming(err, IMAGES_TRAIN)


# --- synthetic tasks -----------------------------------------------------------------------------

GENERATORS_2D = [data.spirals, data.rings, data.checkerboard]


def all_xy(ds: data.Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([ds.x_train, ds.x_test]), torch.cat([ds.y_train, ds.y_test])


@pytest.mark.parametrize("make", [*GENERATORS_2D, data.parity])
def test_synthetic_deterministic_per_seed(make) -> None:
    a, b, c = make(seed=1), make(seed=1), make(seed=2)
    for field in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.x_train, c.x_train)


@pytest.mark.parametrize("make", GENERATORS_2D)
def test_synthetic_2d_shapes_and_balance(make) -> None:
    ds = make(n=1001)
    assert (ds.shape, ds.n_features, ds.n_classes) == ((2,), 2, 2)
    assert (len(ds.x_train), len(ds.x_test)) == (751, 250)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert len(ds.y_train) == len(ds.x_train) and len(ds.y_test) == len(ds.x_test)
    x, y = all_xy(ds)
    counts = torch.bincount(y, minlength=2)
    assert abs(counts[0] - counts[1]) <= 0.1 * len(y)
    assert x.abs().max() < 1.3


def test_spirals_and_rings_classes_exactly_balanced() -> None:
    for ds in (data.spirals(n=1001), data.rings(n=1001)):
        assert torch.bincount(all_xy(ds)[1]).tolist() == [501, 500]


def test_parity_all_vectors() -> None:
    ds = data.parity(bits=8)
    x, y = all_xy(ds)
    assert ds.shape == (8,) and len(x) == 256
    assert len(torch.unique(x, dim=0)) == 256
    assert set(x.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(y, x.sum(1).long() % 2)


@pytest.mark.parametrize("make, message", [
    (lambda: data.spirals(n=100.0), "spirals: n=100.0 must be an integer >= 2"),
    (lambda: data.rings(n=1), "rings: n=1 must be an integer >= 2"),
    (lambda: data.checkerboard(cells=0), "checkerboard: cells=0 must be an integer >= 1"),
    (lambda: data.parity(bits=2.5), "parity: bits=2.5 must be an integer >= 1"),
    (lambda: data.parity(bits=8, n="9"), "parity: n='9' must be an integer >= 1"),
])
def test_generator_arguments_of_the_wrong_type_are_named(make, message) -> None:
    with pytest.raises(DataError, match=re.escape(message)):
        make()
    assert len(data.spirals(n=np.int64(100)).y_train) == 75  # numpy's integers are integers


def test_parity_sampled_vectors_are_distinct() -> None:
    ds = data.parity(bits=40, n=400)
    x, _ = all_xy(ds)
    assert x.shape == (400, 40) and len(torch.unique(x, dim=0)) == 400
    with pytest.raises(DataError, match="out of range"):
        data.parity(bits=4, n=17)


def best_half_plane(x: torch.Tensor, y: torch.Tensor, directions: int = 360) -> float:
    """The best accuracy of any line through the plane (swept over directions and offsets)."""
    best = 0.0
    for a in torch.linspace(0, 2 * math.pi, directions):
        order = (x @ torch.stack([a.cos(), a.sin()])).argsort()
        ys = y[order].float()
        zeros_below = torch.cat([torch.zeros(1), (1 - ys).cumsum(0)])
        ones_above = torch.cat([ys.flip(0).cumsum(0).flip(0), torch.zeros(1)])
        best = max(best, ((zeros_below + ones_above) / len(y)).max().item())
    return best


@pytest.mark.parametrize("make", GENERATORS_2D)
def test_2d_tasks_need_a_nonlinearity(make) -> None:
    ds = make()
    x, y = all_xy(ds)
    assert best_half_plane(x, y) <= 0.65
    linear = LogisticRegression().fit(ds.x_train, ds.y_train)
    assert linear.score(ds.x_test, ds.y_test) <= 0.65
    knn = KNeighborsClassifier().fit(ds.x_train, ds.y_train)
    assert knn.score(ds.x_test, ds.y_test) >= 0.9  # learnable, just not linearly


def test_parity_defeats_a_linear_model() -> None:
    ds = data.parity(bits=8)
    linear = LogisticRegression().fit(ds.x_train, ds.y_train)
    assert linear.score(ds.x_test, ds.y_test) <= 0.65


def test_digits() -> None:
    ds = data.digits()
    x, y = all_xy(ds)
    assert (len(x), ds.n_features, ds.n_classes, ds.shape) == (1797, 64, 10, (8, 8))
    assert len(ds.x_test) == 450 and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() == 0 and x.max() == 1
    assert torch.bincount(ds.y_test, minlength=10).min() >= 40  # stratified
    assert not torch.equal(data.digits(seed=1).y_train, ds.y_train)


# --- load_dataset --------------------------------------------------------------------------------


def test_load_dataset_names_and_subsets(tmp_path: Path) -> None:
    assert set(data.DATASETS) == {
        "spirals", "rings", "checkerboard", "parity", "digits", "mnist", "fashion-mnist", "kmnist"
    }  # fmt: skip
    for name in ("spirals", "rings", "checkerboard", "parity", "digits"):
        ds = data.load_dataset(name, seed=3, n_train=50, n_test=20)
        assert ds.name == name and (len(ds.x_train), len(ds.y_test)) == (50, 20)
    a = data.load_dataset("spirals", seed=3, n_train=50)
    assert torch.equal(a.x_train, data.load_dataset("spirals", seed=3, n_train=50).x_train)
    assert len(a.x_test) == 500
    idx = make_idx_dir(tmp_path / "idx", make_arrays())
    ds = data.load_dataset("kmnist", data_dir=idx, n_train=5)
    assert ds.name == "kmnist" and ds.x_train.shape == (5, 16) and len(ds.x_test) == 10


def test_load_dataset_errors() -> None:
    with pytest.raises(DataError, match=r"unknown dataset 'cifar'.*spirals.*kmnist"):
        data.load_dataset("cifar")
    with pytest.raises(DataError, match=r"n_train=5000 .* 1500 train.*--n-train between 1 and"):
        data.load_dataset("rings", n_train=5000)
    with pytest.raises(DataError, match=r"n_test=0 .* 500 test.*--n-test between 1 and 500"):
        data.load_dataset("rings", n_test=0)


@pytest.mark.parametrize("name", ["spirals", "rings", "checkerboard", "parity", "digits"])
def test_load_dataset_refuses_data_dir_for_built_in_sets(tmp_path: Path, name: str) -> None:
    for directory in (tmp_path, tmp_path / "does-not-exist"):
        with pytest.raises(ValueError, match=r"data_dir \(--data-dir\) applies to mnist, "
                                             r"fashion-mnist, kmnist"):
            data.load_dataset(name, data_dir=directory)


# --- MNIST-like: lookup order, cache, download --------------------------------------------------


def test_data_dir_plain_names_win(tmp_path: Path) -> None:
    arrays = make_arrays()
    ds = data.load_mnist_like("fashion-mnist", data_dir=make_idx_dir(tmp_path, arrays, gz=False))
    assert ds.name == "fashion-mnist" and len(ds.x_train) == 20  # not Debian's 60000


def test_data_dir_missing_files_do_not_fall_back(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing"):
        data.load_mnist_like("mnist", data_dir=tmp_path)


def test_table_is_complete() -> None:
    for entry in data.MNIST_LIKE.values():
        assert [name for name, _ in entry.md5] == list(data.IDX_FILES)
        assert all(len(h) == 32 and int(h, 16) >= 0 for _, h in entry.md5)
    assert set(data.MNIST_LIKE) == {"mnist", "fashion-mnist", "kmnist"}


def test_download_verify_and_cache(
    tmp_path: Path, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    arrays = make_arrays()
    files = gz_files(arrays)
    dead = f"http://127.0.0.1:{closed_port()}/"
    use_mirrors(monkeypatch, [dead, serve(server, "m", files)], files)  # first mirror is down
    ds = data.load_mnist_like("mnist", cache_dir=tmp_path)
    np.testing.assert_array_equal(ds.y_train.numpy(), arrays[1])
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == sorted(data.IDX_FILES)
    assert len(server.requests) == 4 and all(rng is None for _, rng in server.requests)
    data.load_mnist_like("mnist", cache_dir=tmp_path)  # from the cache, verified, no requests
    assert len(server.requests) == 4


def test_cache_root_from_environment(
    tmp_path: Path, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = gz_files(make_arrays())
    use_mirrors(monkeypatch, [serve(server, "m", files)], files)
    monkeypatch.setenv("DEEPLINEAR_CACHE", str(tmp_path / "env"))
    data.load_mnist_like("mnist")
    assert (tmp_path / "env" / "mnist" / IMAGES_TEST).is_file()


def test_idx_files_of_no_samples_are_named(tmp_path: Path) -> None:
    d = make_idx_dir(tmp_path, make_arrays(n_test=0))
    with pytest.raises(DataError, match=re.escape(
            f"{d / data.IDX_FILES[2]}: holds 0 images; the file is cut short at its source")):
        data.load_idx_dataset(d)


def test_a_cache_root_that_is_a_file_is_one_line(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("DEEPLINEAR_CACHE", str(tmp_path / "afile"))
    with pytest.raises(DataError, match=re.escape(
            f"cannot create the download directory {tmp_path / 'afile' / 'mnist'}: Not a "
            "directory; point DEEPLINEAR_CACHE at a writable directory")):
        data.load_mnist_like("mnist")


@pytest.mark.parametrize("honor_range", [True, False])
def test_download_resumes_partial_file(
    tmp_path: Path, server: Server, monkeypatch: pytest.MonkeyPatch, honor_range: bool
) -> None:
    arrays = make_arrays(n_train=200)
    files = gz_files(arrays)
    use_mirrors(monkeypatch, [serve(server, "m", files)], files)
    server.honor_range = honor_range
    half = len(files[IMAGES_TRAIN]) // 2
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / f"{IMAGES_TRAIN}.part").write_bytes(files[IMAGES_TRAIN][:half])
    ds = data.load_mnist_like("mnist", cache_dir=tmp_path)
    np.testing.assert_allclose(ds.x_train.numpy(), arrays[0].reshape(200, 16) / 255, rtol=1e-6)
    assert (f"/m/{IMAGES_TRAIN}", f"bytes={half}-") in server.requests
    assert not list((tmp_path / "mnist").glob("*.part"))


def test_download_restarts_after_a_junk_partial_file(
    tmp_path: Path, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = gz_files(make_arrays())
    use_mirrors(monkeypatch, [serve(server, "m", files)], files)
    monkeypatch.setattr(data, "RETRY_DELAYS_S", (0.0,))
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / f"{LABELS_TRAIN}.part").write_bytes(b"junk")
    data.load_mnist_like("mnist", cache_dir=tmp_path)
    assert [r for r in server.requests if r[0] == f"/m/{LABELS_TRAIN}"] == [
        (f"/m/{LABELS_TRAIN}", "bytes=4-"),
        (f"/m/{LABELS_TRAIN}", None),
    ]


def test_download_restarts_after_range_not_satisfiable(
    tmp_path: Path, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = gz_files(make_arrays())
    use_mirrors(monkeypatch, [serve(server, "m", files)], files)
    monkeypatch.setattr(data, "RETRY_DELAYS_S", (0.0,))
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / f"{IMAGES_TEST}.part").write_bytes(files[IMAGES_TEST] + b"extra")
    data.load_mnist_like("mnist", cache_dir=tmp_path)
    assert [rng for path, rng in server.requests if path == f"/m/{IMAGES_TEST}"] == [
        f"bytes={len(files[IMAGES_TEST]) + 5}-",  # answered 416
        None,
    ]


def test_download_checksum_mismatch(
    tmp_path: Path, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = gz_files(make_arrays())
    other = gz_files(make_arrays(seed=1))
    use_mirrors(monkeypatch, [serve(server, "a", other), serve(server, "b", other)], files)
    monkeypatch.setattr(data, "RETRY_DELAYS_S", (0.0, 0.0))
    with pytest.raises(DataError, match=r"could not download .* MD5 .* expected") as err:
        data.load_mnist_like("mnist", cache_dir=tmp_path)
    msg = assert_one_line_naming(err, IMAGES_TRAIN)
    assert "checksum did not match" in msg and "connection" not in msg
    # the same bytes would come again: each mirror is asked once, then the next one
    assert [path for path, _ in server.requests] == [f"/a/{IMAGES_TRAIN}", f"/b/{IMAGES_TRAIN}"]
    assert not list((tmp_path / "mnist").iterdir())  # nothing unverified is left behind


def test_download_checksum_mismatch_moves_to_next_mirror(
    tmp_path: Path, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = gz_files(make_arrays())
    wrong = serve(server, "wrong", gz_files(make_arrays(seed=1)))
    use_mirrors(monkeypatch, [wrong, serve(server, "good", files)], files)
    monkeypatch.setattr(data, "RETRY_DELAYS_S", (0.0, 0.0))
    data.load_mnist_like("mnist", cache_dir=tmp_path)
    assert [path for path, _ in server.requests if path.endswith(LABELS_TEST)] == [
        f"/wrong/{LABELS_TEST}",
        f"/good/{LABELS_TEST}",
    ]


def test_dropped_connection_resumes(
    tmp_path: Path, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    arrays = make_arrays(n_train=200)
    files = gz_files(arrays)
    use_mirrors(monkeypatch, [serve(server, "m", files)], files)
    monkeypatch.setattr(data, "RETRY_DELAYS_S", (0.0,))
    server.cuts[f"/m/{IMAGES_TRAIN}"] = 1
    ds = data.load_mnist_like("mnist", cache_dir=tmp_path)
    np.testing.assert_allclose(ds.x_train.numpy(), arrays[0].reshape(200, 16) / 255, rtol=1e-6)
    assert [rng for path, rng in server.requests if path == f"/m/{IMAGES_TRAIN}"] == [
        None,
        f"bytes={len(files[IMAGES_TRAIN]) // 3}-",  # the rest, not the whole file again
    ]
    assert not list((tmp_path / "mnist").glob("*.part"))


def test_dropped_connection_keeps_the_partial_file(
    tmp_path: Path, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = gz_files(make_arrays(n_train=200))
    use_mirrors(monkeypatch, [serve(server, "m", files)], files)
    server.cuts[f"/m/{IMAGES_TRAIN}"] = 1
    with pytest.raises(DataError, match=r"truncated: .* after \d+ of \d+ bytes") as err:
        data.load_mnist_like("mnist", cache_dir=tmp_path)  # one try only (the fixture)
    assert "checksum" not in assert_one_line_naming(err, IMAGES_TRAIN)
    part = tmp_path / "mnist" / f"{IMAGES_TRAIN}.part"
    assert part.read_bytes() == files[IMAGES_TRAIN][: len(files[IMAGES_TRAIN]) // 3]
    data.load_mnist_like("mnist", cache_dir=tmp_path)  # the next run resumes it
    assert [rng for path, rng in server.requests if path == f"/m/{IMAGES_TRAIN}"] == [
        None,
        f"bytes={len(files[IMAGES_TRAIN]) // 3}-",
    ]


def test_download_without_a_server(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"from any mirror .*--data-dir") as err:
        data.load_mnist_like("kmnist", cache_dir=tmp_path)
    assert "check your connection" in assert_one_line_naming(err, IMAGES_TRAIN)


def test_each_failed_attempt_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(data, "RETRY_DELAYS_S", (0.0, 0.0))
    with pytest.raises(DataError):
        data.load_mnist_like("kmnist", cache_dir=tmp_path)
    (dead,) = data.MNIST_LIKE["kmnist"].mirrors
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f"downloading {dead}{IMAGES_TRAIN} -> {tmp_path / 'kmnist' / IMAGES_TRAIN}"
    for k, line in enumerate(lines[1:], 1):
        assert line.startswith(f"attempt {k}/3 for {dead}{IMAGES_TRAIN} failed: ")
        assert "refused" in line.lower()
        assert line.endswith("; retrying in 0s") == (k < 3)
    assert len(lines) == 4


def test_mirror_from_environment(
    tmp_path: Path, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = gz_files(make_arrays())
    use_mirrors(monkeypatch, [serve(server, "table", files)], files)
    env = serve(server, "env", files).removesuffix("/")  # the slash is optional
    monkeypatch.setenv("DEEPLINEAR_MIRROR", f" http://127.0.0.1:{closed_port()}/ , {env}")
    data.load_mnist_like("mnist", cache_dir=tmp_path)
    assert sorted(path for path, _ in server.requests) == sorted(f"/env/{n}" for n in files)


@pytest.mark.parametrize("value", ["127.0.0.1/mnist/", "ftp://host/mnist/"])
def test_mirror_from_environment_must_be_http(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("DEEPLINEAR_MIRROR", value)
    with pytest.raises(DataError, match="not an http") as err:
        data.load_mnist_like("mnist", cache_dir=tmp_path)
    assert_one_line_naming(err, "DEEPLINEAR_MIRROR")


def test_download_missing_on_mirror(
    tmp_path: Path, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = gz_files(make_arrays())
    use_mirrors(monkeypatch, [serve(server, "m", {})], files)
    monkeypatch.setattr(data, "RETRY_DELAYS_S", (0.0, 0.0))
    with pytest.raises(DataError, match="HTTP 404"):
        data.load_mnist_like("mnist", cache_dir=tmp_path)
    assert len(server.requests) == 1  # a 404 is not retried


def test_corrupt_cached_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = gz_files(make_arrays())
    use_mirrors(monkeypatch, [f"http://127.0.0.1:{closed_port()}/"], files)
    cache = tmp_path / "mnist"
    cache.mkdir()
    for name, raw in files.items():
        (cache / name).write_bytes(raw)
    assert data.load_mnist_like("mnist", cache_dir=tmp_path).n_features == 16
    (cache / IMAGES_TEST).write_bytes(files[IMAGES_TEST][:-1])
    with pytest.raises(DataError, match="delete it") as err:
        data.load_mnist_like("mnist", cache_dir=tmp_path)
    assert_one_line_naming(err, str(cache / IMAGES_TEST))


def test_own_files_in_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = make_arrays()
    files = gz_files(arrays)
    use_mirrors(monkeypatch, [f"http://127.0.0.1:{closed_port()}/"], files)
    cache = make_idx_dir(tmp_path / "mnist", arrays)
    (cache / IMAGES_TEST).write_bytes(gzip.compress(idx_bytes(arrays[2]), mtime=1))  # re-gzipped
    with pytest.raises(DataError, match="cached file has MD5") as err:
        data.load_mnist_like("mnist", cache_dir=tmp_path)
    assert f"--data-dir {cache} " in assert_one_line_naming(err, str(cache / IMAGES_TEST))
    np.testing.assert_array_equal(data.load_mnist_like("mnist", data_dir=cache).y_test, arrays[3])


def test_no_download_and_empty_cache(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="downloads are off") as err:
        data.load_mnist_like("mnist", cache_dir=tmp_path, download=False)
    assert_one_line_naming(err, IMAGES_TRAIN)


DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is absent")
def test_debian_fashion_mnist(tmp_path: Path) -> None:
    ds = data.load_mnist_like("fashion-mnist", cache_dir=tmp_path, download=False)
    assert (len(ds.x_train), len(ds.x_test), ds.n_features, ds.shape) == (
        60000,
        10000,
        784,
        (28, 28),
    )
    assert torch.bincount(ds.y_test).tolist() == [1000] * 10
    assert ds.x_test.min() >= 0 and ds.x_test.max() <= 1 and ds.x_test.max() > 0.99


def test_another_sets_published_files_are_refused_by_name(tmp_path: Path, monkeypatch) -> None:
    """A --data-dir of kmnist's very files (by MD5) passed as mnist is a mix-up: one line says
    which set they are; re-gzipped or plain files (unknown MD5s) still load unchecked."""
    arrays = make_arrays()
    idx = make_idx_dir(tmp_path / "k", arrays)
    entry = data.MnistLike((), tuple((n, md5(raw)) for n, raw in gz_files(arrays).items()))
    monkeypatch.setitem(data.MNIST_LIKE, "kmnist", entry)
    with pytest.raises(DataError) as err:
        data.load_mnist_like("mnist", data_dir=idx)
    assert assert_one_line_naming(err, "train-images-idx3-ubyte.gz").endswith(
        "this is kmnist's published file, not mnist's; pass --dataset kmnist, or a --data-dir "
        "holding mnist's files")
    assert data.load_mnist_like("kmnist", data_dir=idx).n_classes == 10
    plain = make_idx_dir(tmp_path / "p", arrays, gz=False)
    np.testing.assert_array_equal(data.load_mnist_like("mnist", data_dir=plain).y_test, arrays[3])


def test_a_subset_is_a_seeded_random_sample_not_the_first_rows():
    """Files often sort their rows by class: the first rows of such a file may hold one class."""
    x = torch.arange(200, dtype=torch.float32).view(100, 2)
    y = torch.arange(100) // 10  # sorted: ten rows of each class
    ds = data.Dataset("sorted", x, y, x.clone(), y.clone(), 10, (2,))
    sub = ds.subset(n_train=30, n_test=30, seed=3)
    assert len(set(sub.y_train.tolist())) > 3 and len(set(sub.y_test.tolist())) > 3
    assert not torch.equal(sub.x_test, sub.x_train)  # one generator: the splits draw in turn
    again, other = ds.subset(n_train=30, n_test=30, seed=3), ds.subset(n_train=30, seed=4)
    assert torch.equal(again.x_train, sub.x_train) and torch.equal(again.x_test, sub.x_test)
    assert not torch.equal(other.x_train, sub.x_train)
    for part in (sub, other):  # each row is the one its label belongs to
        assert torch.equal(part.x_train[:, 0] // 20, part.y_train.float())


def test_a_subset_may_take_every_row():
    ds = data.load_dataset("spirals", seed=0)
    sub = ds.subset(n_train=len(ds.x_train), n_test=len(ds.x_test))
    for part in ("x_train", "x_test"):  # every row, in the subset's own order
        rows = sorted(map(tuple, getattr(sub, part).tolist()))
        assert rows == sorted(map(tuple, getattr(ds, part).tolist()))


@pytest.mark.parametrize(("asked", "counts", "named"), [
    ("mnist", (1000,) * 10, "fashion-mnist and kmnist, not as in mnist; pass --dataset "
                            "fashion-mnist or --dataset kmnist"),
    ("kmnist", data.MNIST_LIKE["mnist"].test_counts, "mnist, not as in kmnist; pass --dataset "
                                                     "mnist,"),
])
def test_another_sets_files_are_known_by_their_test_label_counts(tmp_path: Path, asked: str,
                                                                  counts: tuple[int, ...],
                                                                  named: str) -> None:
    """Re-gzipped copies (Debian's Fashion-MNIST) escape the published MD5s; their labels do not."""
    arrays = make_arrays(n_test=sum(counts), side=2)
    arrays[3] = np.repeat(np.arange(10, dtype=np.uint8), counts)
    make_idx_dir(tmp_path, arrays)
    with pytest.raises(DataError) as e:
        data.load_mnist_like(asked, data_dir=tmp_path)
    assert named in assert_one_line_naming(e, str(tmp_path))
    other = "fashion-mnist" if asked == "mnist" else "mnist"
    assert len(data.load_mnist_like(other, data_dir=tmp_path).y_test) == sum(counts)


def test_another_sets_very_test_labels_are_refused(tmp_path: Path, monkeypatch) -> None:
    """Fashion-MNIST and KMNIST both have 1000 test images a class: Fashion-MNIST's own labels
    (their MD5, which no re-gzipping changes) tell its files passed as KMNIST."""
    arrays = make_arrays(n_test=20, side=2)
    arrays[3] = np.repeat(np.arange(10, dtype=np.uint8), 2)
    make_idx_dir(tmp_path, arrays)
    entry = dataclasses.replace(data.MNIST_LIKE["fashion-mnist"], test_counts=(2,) * 10,
                                test_labels_md5=md5(arrays[3].tobytes()))
    monkeypatch.setitem(data.MNIST_LIKE, "fashion-mnist", entry)
    monkeypatch.setitem(data.MNIST_LIKE, "kmnist",
                        dataclasses.replace(data.MNIST_LIKE["kmnist"], test_counts=(2,) * 10))
    with pytest.raises(DataError) as e:
        data.load_mnist_like("kmnist", data_dir=tmp_path)
    assert assert_one_line_naming(e, str(tmp_path)).endswith(
        "its test labels are those as in fashion-mnist, not as in kmnist; pass --dataset "
        "fashion-mnist, or a --data-dir holding kmnist's files")
    assert len(data.load_mnist_like("fashion-mnist", data_dir=tmp_path).y_test) == 20
    shuffled = make_idx_dir(tmp_path / "own", [*arrays[:3], arrays[3][::-1].copy()])
    assert len(data.load_mnist_like("kmnist", data_dir=shuffled).y_test) == 20  # other labels


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_debians_fashion_mnist_passed_as_kmnist_is_refused() -> None:
    """The MD5 in MNIST_LIKE is Fashion-MNIST's real labels' (read from Debian's copy)."""
    with pytest.raises(DataError, match="labels are those as in fashion-mnist, not as in kmnist"):
        data.load_mnist_like("kmnist", data_dir=DEBIAN_FASHION)


def test_a_users_own_set_with_other_counts_loads_under_any_name(tmp_path: Path) -> None:
    make_idx_dir(tmp_path, make_arrays(n_test=30))
    assert len(data.load_mnist_like("mnist", data_dir=tmp_path).y_test) == 30


# --- a Dataset built by hand ---------------------------------------------------------------------


def _toy(**changes: object) -> data.Dataset:
    x, y = torch.rand(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    fields = dict(name="toy", x_train=x, y_train=y, x_test=x[:4], y_test=y[:4], n_classes=3,
                  shape=(3,))
    fields.update(changes)
    return data.Dataset(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("changes, message", [
    ({"x_train": torch.rand(6, 3, dtype=torch.float64)},
     "x_train must be float32 of shape (N, features), got torch.float64 (6, 3); pass x.float()"),
    ({"x_test": torch.rand(4, 3, 1)}, "x_test must be float32 of shape (N, features)"),
    ({"y_test": torch.tensor([[0], [1], [2], [0]])},
     "y_test must be int64 of shape (4,) to match x_test, got torch.int64 (4, 1)"),
    ({"y_train": torch.tensor([0, 1, 2, 0, 1, 2], dtype=torch.int32)},
     "y_train must be int64 of shape (6,)"),
    ({"y_train": torch.tensor([0, 1, 2])}, "y_train must be int64 of shape (6,)"),
    ({"x_test": torch.rand(4, 5)}, "x_test has 5 features but x_train has 3"),
    ({"y_test": torch.tensor([0, 1, 3, 0])}, "y_test spans 0..3, outside 0..2"),
    ({"y_train": torch.tensor([0, -1, 2, 0, 1, 2])}, "y_train spans -1..2, outside 0..2"),
    ({"x_train": torch.tensor([[0.0, math.nan, 0.0]] * 6)}, "x_train holds NaN or infinite"),
    ({"x_test": torch.full((4, 3), math.inf)}, "x_test holds NaN or infinite"),
    ({"n_classes": 1}, "n_classes must be an integer >= 2, got 1"),
    ({"n_classes": 2.0}, "n_classes must be an integer >= 2, got 2.0"),
    ({"x_test": torch.empty(0, 3), "y_test": torch.empty(0, dtype=torch.long)},
     "x_test is empty; every split needs samples"),
    ({"x_train": torch.tensor(1.0)}, "x_train must be float32 of shape (N, features), got "
     "torch.float32 ()"),
    ({"x_train": np.zeros((6, 3), np.float32)}, "must be torch tensors, got ndarray and Tensor"),
])
def test_a_dataset_refuses_what_would_fail_or_score_wrong_later(changes, message):
    with pytest.raises(DataError, match=re.escape(message)):
        _toy(**changes)


def test_a_well_formed_dataset_and_its_subsets_are_accepted():
    ds = _toy()
    assert ds.n_features == 3 and len(ds.subset(2, 2).y_test) == 2
    assert type(_toy(n_classes=np.int64(3)).n_classes) is int  # numpy's integers are integers


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, None, True])
def test_a_data_seed_outside_what_every_set_takes_is_refused(seed):
    with pytest.raises(DataError, match=re.escape(
            f"data seed must be an integer in [0, 2**32) (scikit-learn's range, which splits "
            f"digits), got {seed!r}")):
        data.load_dataset("spirals", seed=seed)


def test_a_numpy_seed_is_a_seed_and_the_range_ends_at_scikit_learn_s():
    a, b = data.load_dataset("digits", seed=np.int64(3)), data.load_dataset("digits", seed=3)
    assert torch.equal(a.x_test, b.x_test)
    assert len(data.load_dataset("digits", seed=2**32 - 1).y_test) == len(b.y_test)
