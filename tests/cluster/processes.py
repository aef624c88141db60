"""Processes a cluster test starts, each in a session of its own, and stops by session id.

`ray stop` or killing by name would also end other people's Ray processes on this machine, so
the tests never do either. Every process a test starts is the leader of a new session; Ray's
daemons and workers, and a server that a shell puts in the background, stay in that session,
so the session id finds all of them and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path


def session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes in session `sid`, read from /proc."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # Fields after the command name, which may itself hold spaces and parentheses.
        fields = text[text.rindex(")") + 2 :].split()
        state, session = fields[0], int(fields[3])
        if session == sid and state != "Z":
            pids.append(int(stat.parent.name))
    return pids


def _signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def stop_sessions(procs: list[subprocess.Popen], grace_s: float = 5.0) -> list[int]:
    """SIGTERM every process of the sessions of `procs`, SIGKILL what is left after `grace_s`.

    Returns the pids still alive at the end (an empty list when all is stopped).
    """
    sids = [p.pid for p in procs]
    for sid in sids:
        _signal_all(session_pids(sid), signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(session_pids(s) for s in sids):
        time.sleep(0.2)
    for sid in sids:
        _signal_all(session_pids(sid), signal.SIGKILL)
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    left = [pid for s in sids for pid in session_pids(s)]
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = [pid for s in sids for pid in session_pids(s)]
    return left
