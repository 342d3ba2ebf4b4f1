"""The signals that stop a deeplinear command, and which of them this process may catch.

Why a module of its own: the entry point (:mod:`deeplinear.__main__`) holds them during its slow
imports and the trainers (:func:`deeplinear.train.stops_cleanly`) finish a step on them; both need
the same two facts, and the entry point must read them before torch loads.
"""

import signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C; `kill PID`, a scheduler's time limit


def catchable() -> list[signal.Signals]:
    """The stop signals not ignored here: one that is ignored (a background job's SIGINT, a
    parent's choice) stays ignored."""
    return [s for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN]
