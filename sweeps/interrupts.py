"""SIGINT and SIGTERM for the commands that drive a sweep: the first stops cleanly, the second
at once, and a stop that hangs is cut short with the sweep's record closed.

The CLI calls `install` before it imports Ray. From then on the first signal is only recorded:
raising it wherever it lands could lose it (Python drops an exception raised inside a garbage
collector callback) or tear Ray's start-up apart half way. The sweep code asks
`raise_if_received` at the points where stopping is safe (after Ray starts, after the data is
staged, before Tune starts), and while Tune runs its own handler asks Tune to stop
(`sweeps.launch`). A second signal raises KeyboardInterrupt wherever it lands, so that the
code setting up the sweep is unwound; while `sweeps.launch` closes the runs, signals are
only noted; once they are closed (`record_closed`) a second signal exits with 130 at once.
A first signal after every trial has ended (`trials_ended`) stops nothing: the driver says
so and finishes the sweep's record (its best model, test accuracy and summary).

The first signal also starts a watchdog. A clean stop takes seconds; one that does not end
within `STOP_GRACE_S` is stuck, typically because the signal went to the whole process group
and killed the local Ray the driver was waiting on. The watchdog then runs the closer the
sweep registered (it ends the sweep's MLflow runs as KILLED) and exits with 130.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

EXIT_INTERRUPTED = 130
STOP_GRACE_ENV = "REGSWEEP_STOP_GRACE_S"
# Below the 30 s that `ray job stop` (and cluster.yaml's RAY_JOB_STOP_WAIT_TIME_S) grants a
# driver before it kills it, and below the 60 s after which a driver whose Ray died aborts.
STOP_GRACE_S = 25.0

_installed = False
_received: str | None = None
_closer: Callable[[], None] | None = None
_record_closed = False
_farewell = ""
_first_note = "stopping cleanly"
_done = threading.Event()


def install() -> None:
    """Handle SIGINT and SIGTERM in this process as the module docstring says (main thread)."""
    global _installed
    _installed = True
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _handler)


def _handler(signum: int, frame: object) -> None:
    name = signal.Signals(signum).name
    if _received is None:
        record(name)
        return
    if _record_closed:
        # Nothing is left to close: stop at once. Raising here could land in Ray's shutdown
        # and leave an exit status that is not the documented one.
        _write(f"received {name} again: stopping at once; the sweep's runs are closed\n")
        if _farewell:
            _write(f"{_farewell}\n")
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
        os._exit(EXIT_INTERRUPTED)
    raise KeyboardInterrupt(name)


def record(name: str) -> None:
    """Note that signal `name` asked the sweep to stop; the first one starts the watchdog."""
    global _received
    if _received is not None:
        return
    _received = name
    _write(f"received {name}: {_first_note}; send it again to stop at once\n")
    if _installed:
        threading.Thread(target=_watch, name="regsweep-stop-watchdog", daemon=True).start()


def note(signum: int, frame: object) -> None:
    """A signal handler that only records the signal (while the sweep's runs are closed)."""
    record(signal.Signals(signum).name)


def trials_ended() -> None:
    """Every trial has ended: a first signal from now on is answered with what happens."""
    global _first_note
    _first_note = "every trial has ended, finishing the sweep's record (a few seconds)"


def received() -> str | None:
    """The name of the first signal received, or None."""
    return _received


def raise_if_received() -> None:
    """Raise KeyboardInterrupt if a signal asked the sweep to stop: call where stopping is safe."""
    if _received is not None:
        raise KeyboardInterrupt(f"{_received} before any trial started: nothing was recorded")


def set_closer(closer: Callable[[], None] | None) -> None:
    """What the watchdog runs before it exits: ends the open sweep's runs. None: nothing open."""
    global _closer
    _closer = closer


def record_closed(farewell: str = "") -> None:
    """Every run of the sweep is in a terminal state: a second signal may now exit at once,
    after writing `farewell` (such as the command that continues the sweep; an empty one
    keeps the last)."""
    global _record_closed, _closer, _farewell
    _closer = None
    _record_closed = True
    _farewell = farewell or _farewell


def finished() -> None:
    """The command is done: the watchdog, if running, must not exit the process any more."""
    _done.set()


def _grace_seconds() -> float:
    try:
        return max(1.0, float(os.environ.get(STOP_GRACE_ENV, STOP_GRACE_S)))
    except ValueError:
        return STOP_GRACE_S


def _watch() -> None:
    grace = _grace_seconds()
    if _done.wait(grace):
        return
    _write(f"the sweep did not stop within {grace:.0f} s; closing its MLflow runs and exiting\n")
    closer = _closer
    if closer is not None:
        try:
            closer()
        except Exception as error:  # exit regardless: the process is stuck
            _write(f"could not close every MLflow run: {error}\n")
    if not _done.is_set():
        sys.stdout.flush()
        os._exit(EXIT_INTERRUPTED)


def _write(text: str) -> None:
    # os.write, not print: a handler may run while the main thread is inside a print.
    with contextlib.suppress(OSError, ValueError):
        os.write(sys.stderr.fileno(), text.encode())
