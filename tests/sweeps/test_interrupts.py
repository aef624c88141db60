"""sweeps.interrupts in a process of its own: what a first and a second signal do, and say."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO


def run_script(body: str) -> subprocess.CompletedProcess[str]:
    """Run `body` after `interrupts.install()`; `signal_me()` sends this process a SIGINT."""
    script = textwrap.dedent(
        """
        import os, signal, time
        from sweeps import interrupts

        def signal_me():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)  # the handler runs between bytecodes of the main thread

        interrupts.install()
        """
    ) + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def test_a_first_signal_is_noted_and_stops_where_it_is_safe() -> None:
    done = run_script(
        """
        signal_me()
        print("still running", flush=True)
        interrupts.raise_if_received()
        """
    )
    assert "received SIGINT: stopping cleanly; send it again to stop at once" in done.stderr
    assert "still running" in done.stdout
    assert done.returncode != 0 and "KeyboardInterrupt" in done.stderr


def test_a_signal_after_every_trial_ended_says_the_record_is_being_finished() -> None:
    done = run_script(
        """
        interrupts.trials_ended()
        signal_me()
        print("record finished", flush=True)
        interrupts.finished()
        """
    )
    assert done.returncode == 0, done.stderr
    assert "received SIGINT: every trial has ended, finishing the sweep's record" in done.stderr
    assert "stopping cleanly" not in done.stderr
    assert "record finished" in done.stdout


@pytest.mark.parametrize("closed", [False, True], ids=["while-open", "once-closed"])
def test_a_second_signal_unwinds_or_once_the_record_is_closed_exits_130(closed: bool) -> None:
    done = run_script(
        f"""
        signal_me()
        if {closed}:
            interrupts.record_closed("Continue it: resume X")
        signal_me()
        print("not reached", flush=True)
        """
    )
    assert "not reached" not in done.stdout
    if closed:
        assert done.returncode == 130
        assert "stopping at once; the sweep's runs are closed" in done.stderr
        assert "Continue it: resume X" in done.stderr
    else:
        assert done.returncode != 0 and "KeyboardInterrupt: SIGINT" in done.stderr
