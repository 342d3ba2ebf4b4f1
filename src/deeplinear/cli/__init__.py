"""The ``deeplinear`` command. Each subcommand lives in its own module beside this one.

Every module exposes ``add_parser(subparsers)`` (which sets ``func`` on its parser) so that adding a
command touches one file. Bad input anywhere surfaces as a ValueError or OSError with a one-line
message (or a RuntimeError from torch, e.g. CUDA out of memory); ``main`` prints its first
line and exits 2. Set DEEPLINEAR_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import NoReturn

from deeplinear import __version__
from deeplinear.arithmetic import PRESETS
from deeplinear.data import NUMPY_SEEDS

COMMANDS = ("probe", "train", "eval", "reproduce", "bench")


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (with the fix: ``--help``), not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def absolute_path(text: str) -> str:
    """argparse type of a path that runs record: absolute, since eval and --resume may run from
    another directory."""
    return str(Path(text).resolve())


MAX_SEED = NUMPY_SEEDS - 1
SEMANTICS = "TF_GPU"  # the commands' default semantics: the 2017 paper's


def seed(text: str) -> int:
    """argparse type of a seed: an integer in 0..2**32 - 1, the range every generator here takes
    (scikit-learn's split the narrowest; torch refused 2**64 with an overflow message)."""
    try:
        value: int | None = int(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"seed {text!r} must be an integer in 0..{MAX_SEED}")
    return value


def preset(text: str) -> str:
    """A preset's name in any case (``ieee`` is ``IEEE``); anything else as given, for the
    caller's own error."""
    return text.upper() if text.upper() in PRESETS else text


def semantics_names(text: str, extra: tuple[str, ...] = ()) -> list[str] | None:
    """``--semantics`` of probe and eval: ``all`` (None), or preset names (any case) and
    ``extra`` (eval's ``collapsed``), comma-separated, each once; an unknown or empty list is a
    one-line error."""
    if text.lower() == "all":
        return None
    choices = (*PRESETS, *extra)
    names = list(dict.fromkeys(preset(s.strip()) for s in text.split(",") if s.strip()))
    unknown = [n for n in names if n not in choices]
    if unknown or not names:
        raise ValueError(f"unknown semantics {', '.join(unknown) or '(none)'}; choose all, or "
                         f"from {', '.join(choices)} (comma-separated)")
    return names


def summary(doc: str | None) -> str | None:
    """A subcommand's ``--help`` description: the first line of its module docstring, without
    its reStructuredText quotes."""
    return doc.splitlines()[0].replace("``", "") if doc else None


def import_commands() -> list[ModuleType]:
    """Every subcommand's module, imported (torch, matplotlib, ...: the CLI's ~2 s of start-up)."""
    return [importlib.import_module(f"deeplinear.cli.{name}") for name in COMMANDS]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="deeplinear",
        description="Nonlinear computation in deep linear networks, through float underflow.",
    )
    parser.add_argument("--version", action="version", version=f"deeplinear {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in import_commands():
        module.add_parser(sub)
    for p in sub.choices.values():  # an unknown flag is reported by the subcommand it was given to
        p.set_defaults(command_parser=p)
    return parser


_ALLOCATION = re.compile(r"can.t allocate memory|cannot allocate memory|out of memory",
                         re.IGNORECASE)
_SIZE = re.compile(r"tried to allocate ([\d.]+) ?(bytes|[KMGT]iB)", re.IGNORECASE)
# what to lower, per command, when memory runs out
_MEMORY_FLAGS = {"train": "--sizes, --pop, --batch-size", "probe": "--sizes, --n",
                 "bench": "--nets, --pops, --batches, --peak-n", "eval": "--n-test",
                 "reproduce": "--dataset, --budget"}


def out_of_memory(e: BaseException, command: str) -> str | None:
    """A one-line message for an allocation that failed (torch's CPU allocator: "... can't
    allocate memory: you tried to allocate 40000000000 bytes"; CUDA's "Tried to allocate 2.00
    GiB"; ENOMEM), naming ``command``'s flags that ask for memory; else None."""
    if not isinstance(e, MemoryError) and not _ALLOCATION.search(str(e)):
        return None
    size = _SIZE.search(str(e))
    if size is None:
        wanted = ""
    elif size.group(2).lower() == "bytes":
        wanted = f" (one tensor of {float(size.group(1)) / 2**30:.1f} GiB)"
    else:
        wanted = f" (one tensor of {size.group(1)} {size.group(2)})"
    gpu = "cuda" in str(e).lower()
    lower = _MEMORY_FLAGS.get(command, "the sizes asked for")
    return (f"out of memory{wanted}: this asks for more than {'the GPU' if gpu else 'this machine'}"
            f" has; lower {lower}" + (" or use --device cpu" if gpu else ""))


def main(argv: list[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        rc = int(args.func(args) or 0)
        sys.stdout.flush()  # here, so that a closed pipe is caught below, not at exit
        return rc
    except BrokenPipeError:  # the reader (``| head``) closed the pipe: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (ValueError, OSError, RuntimeError, MemoryError) as e:
        if os.environ.get("DEEPLINEAR_DEBUG"):
            raise
        from deeplinear.runs import first_line

        msg = out_of_memory(e, args.command) or first_line(e)
        print(f"deeplinear {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"deeplinear {args.command}: interrupted{f' ({e})' if str(e) else ''}",
              file=sys.stderr)
        return 130
