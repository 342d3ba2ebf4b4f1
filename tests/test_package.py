"""``import deeplinear``: the top-level names and modules, imported on first use."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import deeplinear as dl

SRC = Path(dl.__file__).parent


def test_every_module_is_reachable_and_every_top_level_name_is_its_modules_own():
    modules = {p.stem for p in SRC.glob("*.py") if not p.stem.startswith("_")}
    assert set(dl._MODULES) == modules | {"train"}  # train/ is a package; cli/ is the CLI's
    for name, module in dl._NAMES.items():
        assert getattr(dl, name) is getattr(getattr(dl, module), name)
    with pytest.raises(AttributeError, match="has no attribute 'DeepLinea'"):
        dl.DeepLinea  # noqa: B018


def test_what_type_checkers_see_is_what_runs():
    """The TYPE_CHECKING imports (for mypy and editors) name the same things as the lazy table."""
    tree = ast.parse((SRC / "__init__.py").read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If)
                 and getattr(n.test, "id", None) == "TYPE_CHECKING")
    seen = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom)
        for alias in node.names:
            seen[alias.name] = node.module.removeprefix("deeplinear").lstrip(".")
    assert seen == {**dl._NAMES, **dict.fromkeys(dl._MODULES, "")}


def test_importing_the_package_does_not_import_torch():
    code = "import sys, deeplinear; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_trainers_are_reached_from_the_package_without_importing_them_first():
    code = ("import deeplinear as dl; print(dl.train.backprop.Config.__module__, "
            "dl.train.es.Config.__module__, dl.train.cmaes.Config.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [f"deeplinear.train.{m}" for m in ("backprop", "es", "cmaes")]


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_stop_during_the_command_s_imports_is_one_line(tmp_path, sig):
    """The CLI's imports take ~2 s; a Ctrl-C or SIGTERM inside them broke numpy halfway and
    printed a page of traceback. Held until the imports finish, it is one line and exit 130."""
    import signal
    import time

    p = subprocess.Popen([sys.executable, "-m", "deeplinear", "train", "--dataset", "spirals",
                          "--out", str(tmp_path / "r")], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,  # a background job ignores SIGINT:
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # not
    # this command's (an ignored signal stays ignored, as it should)
    time.sleep(0.2)
    p.send_signal(getattr(signal, sig))
    out, err = p.communicate(timeout=120)
    assert (p.returncode, err, out) == (130, "deeplinear: interrupted\n", "")
    assert not (tmp_path / "r").exists()
