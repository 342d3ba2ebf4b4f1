"""``python -m deeplinear`` and the ``deeplinear`` command.

Why a separate entry point: importing the CLI (torch, numpy, matplotlib, every subcommand) takes
about two seconds, and a Ctrl-C landing inside those imports broke them halfway (numpy
half-initialised, then matplotlib failing on it: a page of traceback). Here a signal during the
imports is held until they finish, then the command stops with one line. SIGTERM (``kill``, a
scheduler's time limit) is made a KeyboardInterrupt for the whole command, so it says what Ctrl-C
says everywhere, not only inside a trainer's loop (which stops after its step).
"""

import signal
import sys

from deeplinear.signals import catchable


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt("SIGTERM")


def run() -> None:
    caught = catchable()
    held: list[int] = []
    for s in caught:
        signal.signal(s, lambda signum, frame: held.append(signum))
    from deeplinear import cli

    cli.import_commands()
    handlers = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: _terminated}
    for s in caught:
        signal.signal(s, handlers[s])
    if held:
        print("deeplinear: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(cli.main())


if __name__ == "__main__":
    run()
