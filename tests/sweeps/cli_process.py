"""Run `python -m sweeps ...` as a user does, in a process group the test owns."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import TracebackType

from tests.conftest import REPO


class SweepCli:
    """`python -m sweeps ARGS` in its own process group, with a private Ray temp directory.

    The private RAY_TMPDIR means the command starts its own local Ray rather than joining one
    that another process started on this machine, and shows whether it started Ray at all.
    On exit the whole process group is killed if it still runs, and the temp dir is removed.
    """

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.cwd = cwd
        self.extra_env = env or {}
        self.log_path = cwd / "cli.log"
        # Short: Ray's socket paths under it must stay below 107 characters.
        self.ray_tmpdir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> SweepCli:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_TMPDIR")
        }
        env["RAY_TMPDIR"] = str(self.ray_tmpdir)
        env["PYTHONPATH"] = str(REPO)
        env.update(self.extra_env)
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sweeps", *self.args],
                cwd=self.cwd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        shutil.rmtree(self.ray_tmpdir, ignore_errors=True)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def started_ray(self) -> bool:
        """Whether the command created a Ray session under its private temp dir."""
        return (self.ray_tmpdir / "ray").exists()
