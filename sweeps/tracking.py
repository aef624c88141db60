"""MLflow lineage, written only by the driver.

The driver opens the experiment and the sweep's parent run once, before any trial starts.
`TrialLineage`, a Ray Tune callback that runs in the driver, mirrors each trial into a nested
child run (tag mlflow.parentRunId): params when it starts, metrics every epoch with step =
epoch, and a terminal status with an `outcome` tag when it ends. Workers never talk to MLflow,
so only the head node needs to reach the tracking store.

Outcomes and the MLflow status each maps to:

    completed       FINISHED  trained every epoch
    stopped_early   FINISHED  stopped by the scheduler (ASHA) before the last epoch
    diverged        FAILED    non-finite training loss
    error           FAILED    the trial raised; the error's last lines are in tag `error`
    interrupted     KILLED    the sweep was interrupted (SIGINT, SIGTERM) while it ran

A sweep can be continued by a later driver (`resume`, `extend`): it reopens the same parent
run, adopts the child runs already there (`trial_runs`) and reopens the child of every trial
that Tune resumes, so one sweep stays one parent run however many drivers it took.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, Run, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray.tune import Callback
from ray.tune.experiment import Trial

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
SWEEP_TAG = "regsweep.sweep"
ROLE_TAG = "regsweep.role"
OUTCOME_TAG = "outcome"
# Parent-run tags: the Tune experiment directory a resume restores (the latest one of the
# sweep), and the driver that last ran the sweep, so that a resume can tell a crashed driver
# from a live one.
TUNE_PATH_TAG = "regsweep.tune_path"
DRIVER_HOST_TAG = "regsweep.driver_host"
DRIVER_PID_TAG = "regsweep.driver_pid"
# All the trials the sweep will have had once its last driver is done (extend adds to it).
NUM_TRIALS_TAG = "regsweep.num_trials"
# How many times `extend` added trials; `<tag>.<k>.trials` says how many the k-th added.
EXTENSIONS_TAG = "regsweep.extensions"
OUTCOME_STATUS = {
    "completed": "FINISHED",
    "stopped_early": "FINISHED",
    "diverged": "FAILED",
    "error": "FAILED",
    "interrupted": "KILLED",
}
# Outcomes of a trial that trained (a candidate for the best model), and of one with nothing
# left to run (an interrupted trial resumes).
TRAINED_OUTCOMES = ("completed", "stopped_early")
ENDED_OUTCOMES = (*TRAINED_OUTCOMES, "diverged", "error")
# Result keys that Tune adds or that are not per-epoch measurements.
_NOT_METRICS = {
    "training_iteration",
    "time_this_iter_s",
    "time_total_s",
    "timestamp",
    "pid",
    "time_since_restore",
    "iterations_since_restore",
    "done",
}
_PACKAGES = ("regsweep", "torch", "torchvision", "ray", "optuna", "mlflow", "pandas", "numpy")
ERROR_TAIL_LINES = 20
MLFLOW_TAG_LIMIT = 4_000
# The preflight wants an answer in seconds. MLflow's own defaults (7 retries with exponential
# backoff, 120 s per request) make an unreachable server look like a hang of several minutes.
PREFLIGHT_HTTP_TIMEOUT_S = 10
PREFLIGHT_HTTP_RETRIES = 1
# While a sweep runs, a server that stops answering is given about 15 s (3 retries with
# MLflow's exponential backoff) before the sweep stops, rather than MLflow's 4 minutes per
# request, during which the driver could not even be interrupted.
DRIVER_HTTP_RETRIES = 3
DRIVER_HTTP_TIMEOUT_S = 30


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message says which URI and why."""


class StoreLost(RuntimeError):
    """The tracking store stopped answering while a sweep ran; the sweep was stopped."""


def use_driver_http_settings() -> None:
    """Bound MLflow's HTTP retries for the rest of this process, unless the user set them."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(DRIVER_HTTP_RETRIES))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(DRIVER_HTTP_TIMEOUT_S))


@contextlib.contextmanager
def quick_http_failures() -> Iterator[None]:
    """Within the block, MLflow gives up on an HTTP request after one retry and 10 s."""
    settings = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(PREFLIGHT_HTTP_RETRIES),
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(PREFLIGHT_HTTP_TIMEOUT_S),
    }
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _first_line(error: BaseException, limit: int = 200) -> str:
    # An HTTP client's error can run to 500 characters of connection-pool detail on one line.
    text = str(error).strip()
    if not text:
        return type(error).__name__
    line = text.splitlines()[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def check_store(uri: str, name: str) -> None:
    """The preflight of a new sweep, which writes nothing: can `uri` hold experiment `name`?

    A server must answer and accept this host; a SQLite file must be writable, or creatable
    in an existing, writable folder; the experiment, if it exists, must not be deleted. Raises
    TrackingError naming the URI and the cause, within seconds. Whether a server accepts
    writes shows only when `open_experiment` writes, after the rest of the preflight.
    """
    _refuse_file_store(uri)
    path = _sqlite_path(uri)
    if path is not None:
        _check_sqlite_file(uri, path)
        if not path.exists():
            return  # a new store: nothing in it to check yet
    with _store_errors(uri):
        experiment = MlflowClient(tracking_uri=uri).get_experiment_by_name(name)
        if experiment is not None:
            _check_active(uri, name, experiment.lifecycle_stage)


SERVER_BACKENDS = ("sqlite", "postgresql", "mysql", "mssql")


def check_server_backend(uri: str) -> None:
    """The preflight of `sweeps server`: a database URI MLflow serves, a SQLite file writable.

    Raises TrackingError naming the URI and what is allowed; writes nothing.
    """
    scheme = uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else ""
    if scheme not in SERVER_BACKENDS:
        raise TrackingError(
            f"--backend-store-uri {uri!r} is not a database URI: use sqlite:///PATH or "
            "postgresql://USER@HOST/DB (MLflow also serves mysql:// and mssql://)"
        )
    path = _sqlite_path(uri)
    if path is not None:
        _check_sqlite_file(uri, path, where="--backend-store-uri")
    elif scheme == "sqlite":
        raise TrackingError(
            f"--backend-store-uri {uri!r} names no file: use sqlite:///PATH, e.g. "
            "sqlite:///mlflow.db (three slashes, then the path)"
        )


def open_experiment(uri: str, name: str) -> tuple[MlflowClient, str]:
    """Connect to `uri`, create or find experiment `name`, and prove the store is writable.

    Raises TrackingError with the URI and the cause within seconds, even when a server does
    not answer. Several drivers may open the same experiment at once: the one that loses the
    race to create it uses the winner's, and drivers creating one SQLite store take turns.
    """
    _refuse_file_store(uri)
    path = _sqlite_path(uri)
    if path is not None:
        _check_sqlite_file(uri, path)
    with _sqlite_turn(path), _store_errors(uri):
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            experiment_id = _create_experiment(client, uri, name)
        else:
            _check_active(uri, name, experiment.lifecycle_stage)
            experiment_id = experiment.experiment_id
        # Writable: set (and keep) a harmless experiment tag.
        client.set_experiment_tag(experiment_id, "regsweep.last_preflight", str(int(time.time())))
    return client, experiment_id


@contextlib.contextmanager
def _store_errors(uri: str) -> Iterator[None]:
    """MLflow's quick HTTP failures, and any error of the store as a TrackingError."""
    try:
        with quick_http_failures():
            yield
    except TrackingError:
        raise
    except Exception as error:  # MLflow raises many types for a bad store; report them all.
        reason = _first_line(error)
        hint = "for a server, is it running and is the URI's host and port right?"
        if "Host header" in reason:
            hint = "the server refuses this host name: start it with --allowed-hosts"
        raise TrackingError(
            f"tracking store {uri!r} is not reachable or not writable: {reason}. Check "
            f"tracking.uri, --tracking-uri or MLFLOW_TRACKING_URI ({hint})"
        ) from None


def _check_active(uri: str, name: str, lifecycle_stage: str) -> None:
    if lifecycle_stage != "active":
        raise TrackingError(
            f"experiment {name!r} at {uri} is deleted; restore it in the MLflow UI, "
            "delete it for good with `mlflow gc`, or choose another tracking.experiment"
        )


def _refuse_file_store(uri: str) -> None:
    # MLflow 3 refuses its old file store (a folder of YAML files) unless forced; its own
    # message is long and ends in a cut-off hint, so say it plainly.
    if uri.startswith("file:") or (
        "://" not in uri and uri not in ("databricks", "databricks-uc")
    ):
        raise TrackingError(
            f"tracking store {uri!r} is a plain path, which MLflow reads as its old file "
            "store (a folder of YAML files) that MLflow 3 no longer writes: use a SQLite "
            "file, e.g. sqlite:///mlflow.db, or a server, http://HOST:PORT (set tracking.uri, "
            "--tracking-uri or MLFLOW_TRACKING_URI)"
        )


def _sqlite_path(uri: str) -> Path | None:
    """The file of a sqlite:///PATH URI (relative to the working directory), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


def _check_sqlite_file(
    uri: str, path: Path, where: str = "tracking.uri, --tracking-uri or MLFLOW_TRACKING_URI"
) -> None:
    """A SQLite store must be a writable file, or creatable in an existing, writable folder.

    MLflow itself retries a file it cannot open for about two minutes before it says so.
    Checked by doing: a write transaction that is rolled back, or a temporary file in the
    folder that is removed at once, so that nothing is left behind.
    """
    folder = path.parent
    problem = None
    if path.is_dir():
        problem = "it is a folder, not a file"
    elif not folder.is_dir():
        problem = f"its folder {str(folder)!r} does not exist or is not a folder"
    else:
        try:
            if path.exists():
                with contextlib.closing(sqlite3.connect(f"file:{path}?mode=rw", uri=True)) as db:
                    db.execute("BEGIN IMMEDIATE")
                    db.rollback()
            # SQLite also writes a journal file beside the store.
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".regsweep-check-"):
                pass
        except (OSError, sqlite3.Error) as error:
            problem = f"it cannot be written ({_first_line(error)})"
    if problem is not None:
        raise TrackingError(
            f"tracking store {uri!r} cannot be used: {problem}. Check {where} "
            "(sqlite:///RELATIVE/PATH.db or sqlite:////ABSOLUTE/PATH.db)"
        )


@contextlib.contextmanager
def _sqlite_turn(path: Path | None) -> Iterator[None]:
    """Hold an exclusive lock on a SQLite store's folder, so that drivers create it in turn.

    Two drivers started together on a new store would both run MLflow's schema migrations
    and one would fail half way ("duplicate column name"). The lock is on the folder itself,
    so no lock file is left behind.
    """
    if path is None:
        yield
        return
    import fcntl

    descriptor = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # closing releases the lock


def open_sweep_run(
    uri: str, run_id: str | None = None, experiment: str | None = None
) -> tuple[MlflowClient, Run]:
    """The sweep parent run `run_id`, else the latest sweep of `experiment`, else the latest
    sweep in the store at `uri`.

    The preflight of a command that reads or continues a sweep: it raises TrackingError, within
    seconds, when the store cannot be reached or holds no such sweep, naming what it looked for.
    """
    _refuse_file_store(uri)
    # Reading must not create an empty store where a user mistyped the path.
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise TrackingError(
            f"there is no MLflow store at {uri}: the file does not exist. Check --tracking-uri, "
            "MLFLOW_TRACKING_URI or the spec's tracking.uri (a relative path is relative to "
            "the working directory)"
        )
    try:
        with quick_http_failures():
            client = MlflowClient(tracking_uri=uri)
            if run_id is not None:
                run = client.get_run(run_id)
            else:
                if experiment is None:
                    experiment_ids = [e.experiment_id for e in client.search_experiments()]
                    where = f"the store {uri}"
                else:
                    found = client.get_experiment_by_name(experiment)
                    if found is not None:
                        _check_active(uri, experiment, found.lifecycle_stage)
                    experiment_ids = [found.experiment_id] if found is not None else []
                    where = f"experiment {experiment!r} at {uri}"
                runs = []
                if experiment_ids:
                    runs = client.search_runs(
                        experiment_ids,
                        filter_string=f"tags.`{ROLE_TAG}` = 'sweep'",
                        order_by=["attributes.start_time DESC"],
                        max_results=1,
                    )
                if not runs:
                    raise TrackingError(
                        f"{where} has no sweep runs; check the tracking URI (--tracking-uri, "
                        "MLFLOW_TRACKING_URI or the spec's tracking.uri) and the experiment"
                    )
                run = runs[0]
    except TrackingError:
        raise
    except Exception as error:
        if getattr(error, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
            raise TrackingError(f"there is no run {run_id!r} at {uri}") from None
        raise TrackingError(
            f"tracking store {uri!r} is not reachable or refused the request: "
            f"{_first_line(error)}. Check --tracking-uri, MLFLOW_TRACKING_URI or the spec's "
            "tracking.uri"
        ) from None
    if run.data.tags.get(ROLE_TAG) != "sweep":
        raise TrackingError(
            f"run {run.info.run_id} at {uri} is not a sweep's parent run (tag {ROLE_TAG} is "
            f"{run.data.tags.get(ROLE_TAG)!r}); pass the run id the sweep printed"
        )
    return client, run


def _create_experiment(client: MlflowClient, uri: str, name: str) -> str:
    try:
        return client.create_experiment(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    # Another driver created it between our lookup and our create.
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        raise TrackingError(
            f"experiment {name!r} at {uri} was created and deleted by another driver while "
            "this one started; run the command again"
        )
    return experiment.experiment_id


def git_commit(path: str | Path | None = None) -> str:
    """The commit of the git checkout at `path`, by default the one this code runs from.

    "unknown" outside a checkout: an installed wheel, or a Ray job's uploaded working dir.
    """
    path = Path(__file__).resolve().parent if path is None else path
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def package_versions() -> dict[str, str]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _tail(text: str, lines: int = ERROR_TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])[-MLFLOW_TAG_LIMIT:]


def trial_error_text(trial: Trial) -> str:
    """The last lines of a failed trial's error, from Tune's error file or the trial."""
    try:
        path = trial.error_file
        if path and Path(path).exists():
            return _tail(Path(path).read_text(errors="replace"))
        error = trial.get_error()
    except Exception as reading:  # the trial's storage may be gone; keep the sweep going
        return f"unknown error (Tune's error file could not be read: {reading!r})"
    return _tail(str(error)) if error is not None else "unknown error"


class TrialLineage(Callback):
    """Mirror every Tune trial into a nested MLflow run of the sweep's parent run.

    fixed_params: settings common to all trials, logged as params of each child.
    epochs: the full length of a trial, to tell completed from stopped early.
    progress: called with a one-line summary after every event, or None.

    Set `stopping` to the signal's name once the sweep is being interrupted: from then on a
    trial that ends before its last epoch, or fails, counts as interrupted (KILLED), since a
    signal may reach the trials' processes as well as the driver.

    Tune is given `relay()`, not the lineage itself: Tune pickles its callbacks into the
    experiment's state, and a resumed sweep must write through the resuming driver's lineage,
    not through an unpickled copy of an old one.
    """

    def __init__(
        self,
        client: MlflowClient,
        experiment_id: str,
        parent_run_id: str,
        *,
        sweep: str,
        fixed_params: Mapping[str, Any],
        swept: tuple[str, ...],
        epochs: int,
        num_trials: int,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.client = client
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.sweep = sweep
        self.fixed_params = {k: str(v) for k, v in fixed_params.items()}
        self.swept = swept
        self.epochs = epochs
        self.num_trials = num_trials
        self.progress = progress
        self.stopping: str | None = None
        self.run_ids: dict[str, str] = {}
        self.outcomes: dict[str, str] = {}
        self.last_results: dict[str, dict[str, Any]] = {}
        self.node_logged: set[str] = set()
        # Set when a write to the tracking store failed while trials ran; the sweep stops.
        self.store_error: str | None = None
        # Per trial, the last epoch already in MLflow, for trials adopted from an earlier
        # driver: a trial resumed from an older checkpoint reports those epochs again.
        self.logged_epochs: dict[str, int] = {}

    def adopt(self, trials: Mapping[str, AdoptedTrial]) -> None:
        """Take over the child runs an earlier driver of this sweep made (see `trial_runs`)."""
        for trial_id, known in trials.items():
            self.run_ids[trial_id] = known.run_id
            self.logged_epochs[trial_id] = known.epochs
            if known.outcome in OUTCOME_STATUS:
                self.outcomes[trial_id] = known.outcome

    def relay(self) -> LineageRelay:
        """The callback to give Tune; it forwards to this lineage while it is active."""
        _ACTIVE[self.parent_run_id] = self
        return LineageRelay(self.parent_run_id)

    def release(self) -> None:
        """Stop receiving Tune's events (the sweep's Tune run is over)."""
        if _ACTIVE.get(self.parent_run_id) is self:
            del _ACTIVE[self.parent_run_id]

    # Tune callback hooks

    @contextlib.contextmanager
    def _writing(self, trial: Trial, what: str) -> Iterator[None]:
        """A write that the store refuses stops the sweep: Tune's loop raises what its
        callbacks raise. The trials' record would otherwise go missing while they train."""
        try:
            yield
        except Exception as error:
            self.store_error = f"{what} of trial {trial.trial_id}: {_first_line(error)}"
            raise StoreLost(self.store_error) from error

    def on_trial_start(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        with self._writing(trial, "opening the run"):
            self._start(trial)

    def _start(self, trial: Trial) -> None:
        if trial.trial_id in self.run_ids:
            if trial.trial_id in self.outcomes:
                self._reopen(trial)
            elif trial.trial_id in self.logged_epochs:  # its earlier driver died: still RUNNING
                self._say(trial, f"resumed after epoch {self.logged_epochs[trial.trial_id]}")
            return
        tags = {
            PARENT_TAG: self.parent_run_id,
            SWEEP_TAG: self.sweep,
            ROLE_TAG: "trial",
            "trial_id": trial.trial_id,
            OUTCOME_TAG: "running",
        }
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=str(trial))
        self.run_ids[trial.trial_id] = run.info.run_id
        swept = {name: str(trial.config[name]) for name in self.swept if name in trial.config}
        params = {**self.fixed_params, **swept, "trial_id": trial.trial_id}
        self.client.log_batch(
            run.info.run_id, params=[Param(k, v) for k, v in params.items()], synchronous=True
        )
        self._say(trial, "started " + " ".join(f"{k}={float(v):.4g}" for k, v in swept.items()))

    def on_trial_result(
        self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any
    ) -> None:
        run_id = self.run_ids.get(trial.trial_id)
        if run_id is None:
            return
        self.last_results[trial.trial_id] = dict(result)
        with self._writing(trial, f"logging epoch {_epoch(result)}"):
            self._log_result(trial, run_id, result)

    def _log_result(self, trial: Trial, run_id: str, result: dict) -> None:
        step = _epoch(result)
        if step <= self.logged_epochs.get(trial.trial_id, 0):
            log.debug("trial %s epoch %d is already in MLflow", trial.trial_id, step)
            return
        now = int(time.time() * 1000)
        metrics = [
            Metric(key, float(value), now, step)
            for key, value in result.items()
            if key not in _NOT_METRICS
            and isinstance(value, (int, float))
            and not isinstance(value, bool)
        ]
        tags = []
        if trial.trial_id not in self.node_logged:
            self.node_logged.add(trial.trial_id)
            for key in ("node_ip", "node_id", "hostname", "device"):
                if key in result:
                    tags.append(RunTag(key, str(result[key])))
        self.client.log_batch(run_id, metrics=metrics, tags=tags, synchronous=True)
        self._say(
            trial,
            f"epoch {step}/{self.epochs} val_acc={result.get('val_acc', math.nan):.4f} "
            f"train_loss={result.get('train_loss', math.nan):.4g} "
            f"executed={result.get('executed_fraction', math.nan):.2f}",
        )

    def on_trial_complete(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        last = self.last_results.get(trial.trial_id) or trial.last_result or {}
        if float(last.get("diverged", 0.0)) > 0:
            outcome = "diverged"
        elif _epoch(last) >= self.epochs:
            outcome = "completed"
        elif self.stopping:
            outcome = "interrupted"
        else:
            outcome = "stopped_early"
        self._finish(trial, outcome)

    def on_trial_error(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        outcome = "interrupted" if self.stopping else "error"
        self._finish(trial, outcome, error=trial_error_text(trial))

    # Closing

    def close_open(self, outcome: str = "interrupted") -> int:
        """End every child run not yet ended (after an interrupt); returns how many."""
        open_ids = [t for t in self.run_ids if t not in self.outcomes]
        for trial_id in open_ids:
            self._end(trial_id, outcome)
        return len(open_ids)

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(OUTCOME_STATUS, 0)
        for outcome in self.outcomes.values():
            counts[outcome] += 1
        return counts

    def _reopen(self, trial: Trial) -> None:
        # Tune resumes a trial whose run an earlier driver ended (interrupted, or errored with
        # --retry-errored): the same child run goes on, RUNNING again.
        run_id = self.run_ids[trial.trial_id]
        previous = self.outcomes.pop(trial.trial_id)
        self.node_logged.discard(trial.trial_id)  # it may run on another node now
        self.client.update_run(run_id, status="RUNNING")
        self.client.set_tag(run_id, OUTCOME_TAG, "running")
        if previous == "error":
            with contextlib.suppress(MlflowException):
                self.client.delete_tag(run_id, "error")
        self._say(
            trial,
            f"resumed after epoch {self.logged_epochs.get(trial.trial_id, 0)} ({previous} before)",
        )

    def _finish(self, trial: Trial, outcome: str, error: str | None = None) -> None:
        if trial.trial_id not in self.run_ids or trial.trial_id in self.outcomes:
            return
        self._end(trial.trial_id, outcome, error)
        self._say(trial, outcome)

    def _end(self, trial_id: str, outcome: str, error: str | None = None) -> None:
        # The status first: a run must not stay RUNNING because an artifact upload failed.
        run_id = self.run_ids[trial_id]
        self.outcomes[trial_id] = outcome
        tags = [RunTag(OUTCOME_TAG, outcome)]
        if error is not None:
            tags.append(RunTag("error", error))
        try:
            self.client.log_batch(run_id, tags=tags, synchronous=True)
            self.client.set_terminated(run_id, status=OUTCOME_STATUS[outcome])
            if error is not None:
                self.client.log_text(run_id, error, "error.txt")
        except Exception as failure:  # the store failing here must not end the sweep
            log.warning(
                "could not close MLflow run %s of trial %s as %s: %s",
                run_id,
                trial_id,
                outcome,
                _first_line(failure),
            )

    def _say(self, trial: Trial, what: str) -> None:
        if self.progress is None:
            return
        # An interrupted trial that a resumed sweep will go on with is not done.
        done = sum(1 for o in self.outcomes.values() if o != "interrupted" or self.stopping)
        running = sum(1 for t in self.run_ids if t not in self.outcomes)
        self.progress(
            f"[{done:>3}/{self.num_trials} done, {running} running] trial {trial.trial_id} {what}"
        )


# The lineage of each sweep this driver is running, by parent run id, for `LineageRelay`.
_ACTIVE: dict[str, TrialLineage] = {}


class LineageRelay(Callback):
    """The Tune callback of a sweep: it holds only the parent run id and forwards every trial
    event to the lineage this process runs for that sweep (`TrialLineage.relay`).

    Tune pickles its callbacks into the experiment's state; restored by a later driver, this
    relay reaches that driver's lineage, with its own MLflow client and progress printer.
    """

    def __init__(self, parent_run_id: str) -> None:
        self.parent_run_id = parent_run_id

    def _lineage(self) -> TrialLineage | None:
        lineage = _ACTIVE.get(self.parent_run_id)
        if lineage is None:
            log.warning("no lineage is active for sweep run %s", self.parent_run_id)
        return lineage

    def on_trial_start(self, **info: Any) -> None:
        if lineage := self._lineage():
            lineage.on_trial_start(**info)

    def on_trial_result(self, **info: Any) -> None:
        if lineage := self._lineage():
            lineage.on_trial_result(**info)

    def on_trial_complete(self, **info: Any) -> None:
        if lineage := self._lineage():
            lineage.on_trial_complete(**info)

    def on_trial_error(self, **info: Any) -> None:
        if lineage := self._lineage():
            lineage.on_trial_error(**info)


@dataclass(frozen=True)
class AdoptedTrial:
    """A trial's child run as an earlier driver left it."""

    run_id: str
    outcome: str  # one of OUTCOME_STATUS, or "running" if that driver died
    epochs: int  # the last epoch logged
    swept: dict[str, float]  # the swept values, from the run's params
    val_acc: float  # the last val_acc logged, NaN if none


def trial_runs(
    client: MlflowClient, experiment_id: str, parent_run_id: str, swept: tuple[str, ...]
) -> dict[str, AdoptedTrial]:
    """The child runs of sweep `parent_run_id` in the store, by trial id."""
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'"
    )
    trials = {}
    for run in runs:
        trial_id = run.data.tags.get("trial_id")
        if trial_id is None:
            continue
        metrics, params = run.data.metrics, run.data.params
        trials[trial_id] = AdoptedTrial(
            run_id=run.info.run_id,
            outcome=run.data.tags.get(OUTCOME_TAG, "running"),
            epochs=int(metrics.get("epoch", 0)),
            swept={name: float(params[name]) for name in swept if name in params},
            val_acc=float(metrics.get("val_acc", math.nan)),
        )
    return trials


def _epoch(result: Mapping[str, Any]) -> int:
    """The epoch a result belongs to: its `epoch` metric, else Tune's iteration count.

    `epoch` survives a trial's restore from a checkpoint, so steps stay = epochs.
    """
    value = result.get("epoch", result.get("training_iteration", 0))
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def log_summary(client: MlflowClient, parent_run_id: str, metrics: Mapping[str, float]) -> None:
    """Log the sweep's summary metrics (step 0) to the parent run; log, never raise, on error."""
    now = int(time.time() * 1000)
    try:
        client.log_batch(
            parent_run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
            synchronous=True,
        )
    except Exception as error:
        log.warning(
            "could not log the sweep summary to MLflow run %s: %s",
            parent_run_id,
            _first_line(error),
        )


def end_run(client: MlflowClient, run_id: str, status: str) -> None:
    """Set a run's terminal status, logging rather than raising on failure."""
    try:
        client.set_terminated(run_id, status=status)
    except Exception as error:
        log.warning("could not end MLflow run %s as %s: %s", run_id, status, _first_line(error))


def close_stale_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> int:
    """Mark any child run of this sweep still RUNNING as KILLED; returns how many there were.

    The last line of defence after an interrupt: it finds runs by their parent tag in the
    store itself, so it also closes runs the callback created but never saw end.
    """
    try:
        stale = client.search_runs(
            [experiment_id],
            filter_string=(
                f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'RUNNING'"
            ),
        )
        for run in stale:
            client.set_tag(run.info.run_id, OUTCOME_TAG, "interrupted")
            client.set_terminated(run.info.run_id, status=RunStatus.to_string(RunStatus.KILLED))
    except Exception as error:
        log.warning(
            "could not close the RUNNING runs of sweep run %s: %s",
            parent_run_id,
            _first_line(error),
        )
        return 0
    return len(stale)
