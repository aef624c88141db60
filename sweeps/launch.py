"""Run, resume and extend sweeps: preflight, stage data, open lineage, then Tune.

The order matters. The preflight only reads: the tracking store, the storage path and the Ray
address are checked before Ray starts, the cluster's resources once it has, and the data is
staged before anything is written. A refused sweep therefore leaves nothing behind: no store
file, no experiment, no run. The experiment and the parent run are opened (or, to continue a
sweep, reopened) only once all of that has passed. From then on a `finally` block, and for a
stop that hangs the watchdog of `sweeps.interrupts`, guarantee that every MLflow run of the
sweep ends in a terminal state, however the sweep ends.

`run_sweep` starts a Tuner(OptunaSearch + ASHA); `resume_sweep` restores the Tune experiment of
an interrupted sweep; `extend_sweep` starts a new Tune experiment for more trials whose searcher
is warm-started by the trials already there. All three drive Tune through `_drive`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import optuna
import ray
import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from sweeps import analysis, interrupts, tracking
from sweeps.data import DeviceSplit, StagedData, stage_dataset
from sweeps.spec import SWEPT, SweepSpec, load_spec, parse_spec
from sweeps.train import TrialConfig, build_model, evaluate
from sweeps.trainable import load_checkpoint_state, train_trial

log = logging.getLogger(__name__)

# Checkpointing every epoch of short digits trials trips a Tune warning meant for slow remote
# storage; it says nothing useful here.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
# Tune's newer console output prints a configuration box and a TensorBoard hint even at
# verbose=0; its older reporter prints nothing at verbose=0. regsweep prints its own progress.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


class _DropTuneHints(logging.Filter):
    """Drops Tune's log lines that say the wrong thing to a regsweep user.

    "Resume experiment with: Tuner.restore(...)" after an interrupt: a sweep is resumed with
    regsweep's own command, which the driver prints; restoring the Tuner alone would leave the
    MLflow runs behind. "Failed to fetch metrics" for a trial interrupted before its first
    epoch: results are read back from MLflow, where that trial is recorded as interrupted.
    """

    HINTS = ("Resume experiment with:", "Failed to fetch metrics for")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(hint in message for hint in self.HINTS)


for _name in ("ray.tune.tune", "ray.tune.analysis.experiment_analysis"):
    logging.getLogger(_name).addFilter(_DropTuneHints())

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
METRIC, MODE = "val_acc", "max"


class PreflightError(RuntimeError):
    """The sweep cannot start; nothing has been launched. The message says how to fix it."""


@dataclass
class SweepResult:
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    status: str
    outcomes: dict[str, int]
    best: dict[str, Any] = field(default_factory=dict)
    storage_path: str = ""
    tune_path: str = ""  # the Tune experiment directory of this driver's run


def resolve_tracking_uri(spec: SweepSpec, override: str | None = None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else the spec's tracking.uri, else SQLite."""
    return (
        override
        or os.environ.get("MLFLOW_TRACKING_URI")
        or spec.tracking.uri
        or (DEFAULT_TRACKING_URI)
    )


STORAGE_ENV = "REGSWEEP_STORAGE_PATH"


def resolve_storage(spec: SweepSpec, override: str | None = None) -> str:
    """Absolute local path or a URI (s3://, gs://, ...) for Tune's results and checkpoints.

    --storage-path, else $REGSWEEP_STORAGE_PATH (cluster.yaml sets it on every node to the
    cluster's bucket), else the spec's storage.path.
    """
    path = override or os.environ.get(STORAGE_ENV) or spec.storage.path
    if "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


# How long the preflight waits for a remote storage path (s3://, gs://) to answer.
REMOTE_STORAGE_TIMEOUT_S = 30


def check_storage(path: str) -> None:
    """Refuse a storage path Tune could not write, without writing anything there.

    A local path must be a folder, or creatable in the nearest folder that exists, which must
    be writable (proved with a temporary file removed at once). A URI must answer through
    pyarrow's file systems, which Tune uses, within REMOTE_STORAGE_TIMEOUT_S.
    """
    if "://" in path:
        _check_remote_storage(path)
        return
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    problem = None
    if not existing.is_dir():
        problem = f"{str(existing)!r} is not a folder"
    else:
        try:
            with tempfile.NamedTemporaryFile(dir=existing, prefix=".regsweep-check-"):
                pass
        except OSError as error:
            problem = f"{str(existing)!r} is not writable ({error.strerror})"
    if problem is not None:
        raise PreflightError(
            f"the storage path {path!r} cannot hold Tune's results: {problem}; choose a "
            f"folder you can write (the path is --storage-path, else ${STORAGE_ENV}, else the "
            "spec's storage.path)"
        )


def _check_remote_storage(path: str) -> None:
    import pyarrow.fs

    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            filesystem, inside = pyarrow.fs.FileSystem.from_uri(path)
            filesystem.get_file_info(inside)
            outcome.append(None)
        except BaseException as error:  # reported by the caller
            outcome.append(error)

    # A cloud client without a network retries for minutes; the preflight waits a while only.
    thread = threading.Thread(target=probe, name="regsweep-storage-check", daemon=True)
    thread.start()
    thread.join(REMOTE_STORAGE_TIMEOUT_S)
    if outcome and outcome[0] is None:
        return
    reason = (
        str(outcome[0]).strip().splitlines()[0][:300]
        if outcome and str(outcome[0]).strip()
        else f"no answer within {REMOTE_STORAGE_TIMEOUT_S} s"
    )
    raise PreflightError(
        f"storage path {path!r} cannot be reached: {reason}. Check the bucket's name, this "
        "machine's credentials and network (on a cluster: REGSWEEP_STORAGE_PATH in "
        "cluster.yaml), or pass --storage-path"
    )


def check_shared_storage(path: str, shared: bool, alive_nodes: int) -> None:
    """Refuse a head-only storage path on a cluster of more than one node.

    Tune writes each trial's checkpoints from the node the trial runs on, so on a multi-node
    cluster the storage path must be one that every node reaches: a URI (s3://, gs://), or a
    local path on a shared file system, declared with storage.shared: true.
    """
    if alive_nodes <= 1 or "://" in path or shared:
        return
    raise PreflightError(
        f"storage.path {path!r} is a local directory, but the Ray cluster has {alive_nodes} "
        "nodes and trials on the other nodes cannot write their checkpoints to the head's "
        f"disk. Set storage.path, --storage-path or ${STORAGE_ENV} to a location every node "
        "can reach (e.g. s3://BUCKET/regsweep), or, if this path is on a file system every "
        "node mounts (NFS, EFS), set storage.shared: true in the spec"
    )


def _check_resources(spec: SweepSpec, local: bool, say: Callable[[str], None]) -> None:
    """One trial must fit the cluster. A local Ray cannot grow, so a misfit is refused; a
    joined cluster may have an autoscaler that adds GPU workers on demand, so it is told."""
    available = ray.cluster_resources()
    need = {"CPU": spec.resources.cpus_per_trial, "GPU": spec.resources.gpus_per_trial}
    need.update(spec.resources.custom)
    short = {k: v for k, v in need.items() if v > 0 and available.get(k, 0.0) < v}
    if not short:
        return
    have = {k: available.get(k, 0.0) for k in short}
    if local:
        raise PreflightError(
            f"one trial needs {short} but this machine's Ray has {have}: lower "
            "resources.cpus_per_trial / gpus_per_trial, or join a cluster with --address"
        )
    say(
        f"warning: one trial needs {short} and the cluster has {have} now; trials wait until "
        "the autoscaler adds a node that fits (check cluster.yaml's worker types if none comes)"
    )


def _searcher(
    spec: SweepSpec,
    evaluated: list[tuple[dict[str, float], float]] | None = None,
    extension: int = 0,
) -> OptunaSearch:
    """Seeded TPE over the spec's ranges; `evaluated` warm-starts it with (values, val_acc).

    The k-th `extension` of a sweep seeds its sampler with search.seed + k. With the sweep's
    own seed, a sampler that is still in its random start-up phase (fewer evaluated trials
    than search.n_startup_trials) would draw again exactly the values the sweep began with.
    """
    space = spec.search.space
    distributions = {}
    for name in SWEPT:
        r = getattr(space, name)
        distributions[name] = optuna.distributions.FloatDistribution(r.low, r.high, log=r.log)
    sampler = optuna.samplers.TPESampler(
        seed=(spec.search.seed + extension) % 2**32,
        n_startup_trials=spec.search.n_startup_trials,
    )
    points = [values for values, _ in evaluated or []]
    rewards = [reward for _, reward in evaluated or []]
    return OptunaSearch(
        space=distributions,
        metric=METRIC,
        mode=MODE,
        sampler=sampler,
        points_to_evaluate=points or None,
        evaluated_rewards=rewards or None,
    )


def _scheduler(spec: SweepSpec) -> ASHAScheduler | FIFOScheduler:
    if spec.scheduler.name == "fifo":
        return FIFOScheduler()
    # Rungs count the trial's own `epoch`, which a trial restored from a checkpoint carries
    # on, rather than Tune's iteration count, which restarts.
    return ASHAScheduler(
        time_attr="epoch",
        max_t=spec.training.epochs,
        grace_period=spec.scheduler.grace_period,
        reduction_factor=spec.scheduler.reduction_factor,
    )


def searcher_settings(spec: SweepSpec) -> dict[str, str]:
    s = spec.scheduler
    return {
        "searcher": "optuna.TPESampler",
        "searcher.seed": str(spec.search.seed),
        "searcher.n_startup_trials": str(spec.search.n_startup_trials),
        "scheduler": s.name,
        "scheduler.grace_period": str(s.grace_period),
        "scheduler.reduction_factor": str(s.reduction_factor),
        "metric": f"{METRIC} ({MODE})",
    }


def _init_ray(address: str | None) -> bool:
    """Join `address` (or $RAY_ADDRESS), else start a local Ray; True if we started it."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        check_ray_address(address)
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        except ConnectionError as error:
            raise PreflightError(
                f"no Ray cluster found at address {address!r} ({error}); start one with "
                "`ray start --head`, or check --address and $RAY_ADDRESS"
            ) from None
        return False
    # address="local": always a new Ray for this sweep, never a `ray start` cluster that
    # happens to run on this machine.
    ray.init(
        address="local",
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    return True


# How long the preflight waits for a Ray head to accept a connection.
RAY_CONNECT_TIMEOUT_S = 5


def check_ray_address(address: str) -> None:
    """Refuse in seconds a Ray address nothing listens at: ray.init would wait for minutes.

    "auto" (the cluster `ray start` left on this machine) is left to ray.init, which fails at
    once when there is none.
    """
    if address == "auto":
        return
    if "://" in address:
        raise PreflightError(
            f"Ray address {address!r} is not supported: give the head's address HOST:PORT "
            "(port 6379 unless `ray start --port` said otherwise), or submit the sweep with "
            "`ray job submit` as the README shows"
        )
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise PreflightError(
            f"Ray address {address!r} is not HOST:PORT: give the head's address, e.g. "
            "127.0.0.1:6379, with --address or $RAY_ADDRESS"
        )
    try:
        endpoint = (host.strip("[]"), int(port))  # [::1]:6379 is an IPv6 address
        socket.create_connection(endpoint, timeout=RAY_CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise PreflightError(
            f"no Ray cluster answers at {address!r} ({error.strerror or error}); start one "
            "with `ray start --head`, or check --address and $RAY_ADDRESS"
        ) from None


@contextlib.contextmanager
def _ray_session(
    spec: SweepSpec, uri: str, storage: str, address: str | None, say: Callable[[str], None]
) -> Iterator[None]:
    """Ray, started or joined, checked to serve the sweep; a Ray we started stops after."""
    started_ray = _init_ray(address)
    try:
        alive = sum(1 for node in ray.nodes() if node.get("Alive"))
        check_shared_storage(storage, spec.storage.shared, alive)
        _check_resources(spec, local=started_ray, say=say)
        say(f"ray: {ray.cluster_resources()}; tracking: {uri}; storage: {storage}")
        yield
    finally:
        if started_ray:
            ray.shutdown()


class _Interrupted(Exception):
    pass


class _SignalStop:
    """SIGINT or SIGTERM during tuner.fit(): stop Tune gracefully and remember the signal.

    Tune's own SIGINT handler ends the run as if it had finished (fit() returns normally), so
    it is turned off (TUNE_DISABLE_SIGINT_HANDLER) and this handler asks Tune to stop through
    the SIGUSR1 handler Tune installs while it runs. A signal that arrives before Tune listens,
    or a second signal, raises at once.
    """

    def __init__(self, lineage: tracking.TrialLineage) -> None:
        self.lineage = lineage
        # A signal the CLI received before Tune was built (see sweeps.interrupts).
        self.name: str | None = interrupts.received()
        self.lineage.stopping = self.name
        self.usr1_before = signal.getsignal(signal.SIGUSR1)

    def __call__(self, signum: int, frame: Any) -> None:
        first = self.name is None
        self.name = self.name or signal.Signals(signum).name
        self.lineage.stopping = self.name
        interrupts.record(self.name)
        tune_stop = signal.getsignal(signal.SIGUSR1)
        if first and callable(tune_stop) and tune_stop is not self.usr1_before:
            tune_stop(signum, frame)
            return
        raise _Interrupted(self.name)


@dataclass
class _Sweep:
    """A sweep whose parent run is open in this driver, and what its Tune run needs."""

    spec: SweepSpec
    client: mlflow.MlflowClient
    uri: str
    experiment_id: str
    parent_id: str
    tune_path: str  # the Tune experiment directory this driver runs (or restores)
    say: Callable[[str], None]
    adopted: dict[str, tracking.AdoptedTrial] = field(default_factory=dict)
    num_trials: int = 0  # trials the sweep will have had when this driver is done
    seconds_before: float = 0.0  # driver time the sweep took before this driver


# Builds the Tuner from the wrapped trainable and the lineage's callback.
TunerFactory = Callable[[Any, tune.Callback], tune.Tuner]


def run_sweep(
    spec: SweepSpec,
    *,
    spec_path: str | None = None,
    tracking_uri: str | None = None,
    storage_path: str | None = None,
    address: str | None = None,
    progress: Callable[[str], None] | None = None,
    trainable: Callable[..., None] = train_trial,
) -> SweepResult:
    """Run `spec` to the end and return where its record is and how its trials ended.

    Raises PreflightError (nothing started, nothing written to MLflow) when the tracking
    store, the storage path or the cluster cannot serve the sweep. `trainable` is replaceable
    for tests that need a trial to fail on purpose.
    """
    say = progress or _silent
    uri = resolve_tracking_uri(spec, tracking_uri)
    storage = resolve_storage(spec, storage_path)

    # Preflight, reading only: the tracking store and the storage path, before Ray starts.
    _check_store(uri, spec.experiment)
    check_storage(storage)

    with _ray_session(spec, uri, storage, address, say):
        interrupts.raise_if_received()
        data, data_ref = _stage(spec, say)
        interrupts.raise_if_received()

        # Everything that could refuse the sweep has passed: the first writes.
        client, experiment_id = _open_store(uri, spec.experiment)
        parent_id = _open_parent(client, experiment_id, spec, spec_path)
        sweep = _Sweep(
            spec,
            client,
            uri,
            experiment_id,
            parent_id,
            tune_path=_join(storage, f"{spec.name}-{parent_id[:8]}"),
            say=say,
            num_trials=spec.search.num_trials,
        )

        def new_tuner(wrapped: Any, callback: tune.Callback) -> tune.Tuner:
            return _tuner(spec, wrapped, callback, sweep.tune_path, _searcher(spec))

        return _drive(sweep, data, data_ref, trainable, new_tuner)


def resume_sweep(
    tracking_uri: str,
    *,
    run_id: str | None = None,
    experiment: str | None = None,
    address: str | None = None,
    progress: Callable[[str], None] | None = None,
    trainable: Callable[..., None] = train_trial,
    retry_errored: bool = False,
    force: bool = False,
) -> SweepResult:
    """Continue an interrupted or crashed sweep where it stopped, in the same MLflow runs.

    The sweep is `run_id`, or the latest sweep of `experiment`. Tune restores its experiment
    (searcher state, trials, checkpoints) from the sweep's storage path: unfinished trials go
    on from their last checkpoint in their own child runs, and the searcher proposes the
    trials not yet started. Trials that raised stay failed unless `retry_errored`, which
    resumes them from their last checkpoint too. A RUNNING sweep is taken over only when its
    driver is gone (checked on this host; `force` skips the check).
    """
    say = progress or _silent
    client, parent = _open_sweep_run(tracking_uri, run_id, experiment)
    parent_id, status = parent.info.run_id, parent.info.status
    if status == "FINISHED":
        raise PreflightError(
            f"sweep run {parent_id} finished: there is nothing to resume. To add trials to it: "
            f"{extend_command(tracking_uri, parent_id)}"
        )
    if status == "RUNNING" and not force:
        _refuse_live_driver(parent)
    adopted = tracking.trial_runs(client, parent.info.experiment_id, parent_id, SWEPT)
    outcomes = [trial.outcome for trial in adopted.values()]
    trained = any(outcome in tracking.TRAINED_OUTCOMES for outcome in outcomes)
    retried = retry_errored and "error" in outcomes
    if _every_trial_ended(parent, adopted) and not trained and not retried:
        raise PreflightError(
            f"sweep run {parent_id} has no trial left to run: all {len(adopted)} ended "
            f"({_outcome_counts(outcomes)}) and none trained, so resuming would change nothing. "
            f"Add trials to it (TPE learns from these): {extend_command(tracking_uri, parent_id)}"
            + (", or retry the errored ones with --retry-errored" if "error" in outcomes else "")
        )
    spec = _stored_spec(client, parent_id)
    tune_path = parent.data.tags.get(tracking.TUNE_PATH_TAG, "")
    if not tune_path or not tune.Tuner.can_restore(tune_path):
        raise PreflightError(
            f"sweep run {parent_id} cannot be resumed: Tune's state of it is not at "
            f"{tune_path or '(no path recorded)'!r} (no tuner.pkl there). Start the sweep again "
            f"with `{analysis.sweeps_command()} run SPEC`"
        )
    say(f"resuming sweep run {parent_id} ({status}) from {tune_path}")

    with _ray_session(spec, tracking_uri, _parent_of(tune_path), address, say):
        data, data_ref = _stage(spec, say)
        sweep = _Sweep(
            spec,
            client,
            tracking_uri,
            parent.info.experiment_id,
            parent_id,
            tune_path=tune_path,
            say=say,
            adopted=adopted,
            seconds_before=parent.data.metrics.get("sweep_seconds", 0.0),
        )
        sweep.num_trials = int(
            parent.data.tags.get(tracking.NUM_TRIALS_TAG, spec.search.num_trials)
        )
        interrupts.raise_if_received()
        _reopen_parent(client, parent_id)

        def restore(wrapped: Any, callback: tune.Callback) -> tune.Tuner:
            # The callback pickled in Tune's state is a LineageRelay for this parent run; it
            # reaches the lineage this driver opened, so `callback` itself is not needed.
            return tune.Tuner.restore(
                tune_path,
                trainable=wrapped,
                resume_unfinished=True,
                resume_errored=retry_errored,
            )

        return _drive(sweep, data, data_ref, trainable, restore)


def extend_sweep(
    tracking_uri: str,
    trials: int,
    *,
    run_id: str | None = None,
    experiment: str | None = None,
    storage_path: str | None = None,
    address: str | None = None,
    progress: Callable[[str], None] | None = None,
    trainable: Callable[..., None] = train_trial,
) -> SweepResult:
    """Add `trials` trials to a finished sweep, in the same parent run.

    The searcher starts from everything the sweep has learned: TPE is warm-started with every
    trial that trained or diverged (its swept values and final val_acc), so the new trials
    are proposed where the earlier ones point rather than at random. ASHA compares the new
    trials among themselves. The best model is replaced only by a better new trial.
    """
    say = progress or _silent
    client, parent = _open_sweep_run(tracking_uri, run_id, experiment)
    parent_id, status = parent.info.run_id, parent.info.status
    if status == "RUNNING":
        raise PreflightError(
            f"sweep run {parent_id} is RUNNING: wait for its driver to finish, then extend "
            f"it; if that driver is gone, resume the sweep first ({analysis.sweeps_command()} "
            f"resume --run-id {parent_id})"
        )
    experiment_id = parent.info.experiment_id
    adopted = tracking.trial_runs(client, experiment_id, parent_id, SWEPT)
    # FAILED with every trial ended: no trial trained (they all diverged or raised), and
    # more trials, proposed by a TPE that learned from these, are the way on.
    if status != "FINISHED" and not (status == "FAILED" and _every_trial_ended(parent, adopted)):
        raise PreflightError(
            f"sweep run {parent_id} is {status}, not finished: resume it first "
            f"({analysis.sweeps_command()} resume --run-id {parent_id}), then extend it"
        )
    stored = _stored_spec(client, parent_id)
    data = stored.model_dump(mode="json")
    data["search"]["num_trials"] = trials
    spec = parse_spec(data, source=f"sweep run {parent_id}'s spec with --trials {trials}")
    storage = resolve_storage(spec, storage_path)
    check_storage(storage)

    evaluated = _evaluated_trials(spec, adopted)
    extension = int(parent.data.tags.get(tracking.EXTENSIONS_TAG, "0")) + 1
    say(
        f"extending sweep run {parent_id} by {trials} trials; TPE starts from "
        f"{len(evaluated)} of its {len(adopted)} trials"
    )

    with _ray_session(spec, tracking_uri, storage, address, say):
        data_staged, data_ref = _stage(spec, say)
        sweep = _Sweep(
            spec,
            client,
            tracking_uri,
            experiment_id,
            parent_id,
            tune_path=_join(storage, f"{spec.name}-{parent_id[:8]}-extend{extension}"),
            say=say,
            adopted=adopted,
            num_trials=len(adopted) + trials,
            seconds_before=parent.data.metrics.get("sweep_seconds", 0.0),
        )
        interrupts.raise_if_received()
        _reopen_parent(
            client,
            parent_id,
            {
                tracking.EXTENSIONS_TAG: str(extension),
                f"{tracking.EXTENSIONS_TAG}.{extension}.trials": str(trials),
                f"{tracking.EXTENSIONS_TAG}.{extension}.seed": str(
                    (spec.search.seed + extension) % 2**32
                ),
                tracking.NUM_TRIALS_TAG: str(sweep.num_trials),
            },
        )

        def new_tuner(wrapped: Any, callback: tune.Callback) -> tune.Tuner:
            searcher = _searcher(spec, evaluated, extension)
            return _tuner(spec, wrapped, callback, sweep.tune_path, searcher)

        return _drive(sweep, data_staged, data_ref, trainable, new_tuner)


def _silent(line: str) -> None:
    pass


def _join(storage: str, name: str) -> str:
    return f"{storage.rstrip('/')}/{name}"


def _parent_of(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[0]


def _check_store(uri: str, experiment: str) -> None:
    try:
        tracking.check_store(uri, experiment)
    except tracking.TrackingError as error:
        raise PreflightError(str(error)) from None


def _open_store(uri: str, experiment: str) -> tuple[mlflow.MlflowClient, str]:
    try:
        return tracking.open_experiment(uri, experiment)
    except tracking.TrackingError as error:
        raise PreflightError(str(error)) from None


def _open_sweep_run(
    uri: str, run_id: str | None, experiment: str | None
) -> tuple[mlflow.MlflowClient, mlflow.entities.Run]:
    try:
        return tracking.open_sweep_run(uri, run_id, experiment)
    except tracking.TrackingError as error:
        raise PreflightError(str(error)) from None


def _stored_spec(client: mlflow.MlflowClient, parent_id: str) -> SweepSpec:
    """The spec a sweep ran with (smoke-test shrinking and --trials included)."""
    with tempfile.TemporaryDirectory() as directory:
        try:
            path = client.download_artifacts(parent_id, "spec.yaml", directory)
        except Exception as error:
            raise PreflightError(
                f"sweep run {parent_id} has no readable spec.yaml artifact ({error}); it "
                "cannot be continued"
            ) from None
        return load_spec(path)


def _refuse_live_driver(parent: mlflow.entities.Run) -> None:
    """A RUNNING sweep may only be taken over when its driver is gone."""
    tags = parent.data.tags
    host, pid = tags.get(tracking.DRIVER_HOST_TAG), tags.get(tracking.DRIVER_PID_TAG)
    run_id = parent.info.run_id
    if host != socket.gethostname():
        raise PreflightError(
            f"sweep run {run_id} is RUNNING under a driver on host {host!r}: resume it there, "
            "or pass --force if that driver is gone"
        )
    if pid and _process_alive(int(pid)):
        raise PreflightError(
            f"sweep run {run_id} is RUNNING and its driver (pid {pid}) is alive: let it "
            f"finish, or stop it (kill -INT {pid}) and resume it then"
        )


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _every_trial_ended(
    parent: mlflow.entities.Run, adopted: dict[str, tracking.AdoptedTrial]
) -> bool:
    """Whether every trial the sweep planned has a run that ended for good (not interrupted,
    not left RUNNING), so that neither Tune nor `resume` has anything left to run."""
    planned = int(parent.data.tags.get(tracking.NUM_TRIALS_TAG, "0"))
    ended = sum(trial.outcome in tracking.ENDED_OUTCOMES for trial in adopted.values())
    return planned > 0 and ended == len(adopted) >= planned


def _outcome_counts(outcomes: list[str]) -> str:
    return ", ".join(f"{outcomes.count(o)} {o}" for o in sorted(set(outcomes)))


def _evaluated_trials(
    spec: SweepSpec, adopted: dict[str, tracking.AdoptedTrial]
) -> list[tuple[dict[str, float], float]]:
    """(swept values, final val_acc) of the trials that trained or diverged, for TPE."""
    evaluated = []
    for trial in adopted.values():
        if trial.outcome not in (*tracking.TRAINED_OUTCOMES, "diverged"):
            continue
        if set(trial.swept) != set(SWEPT) or not math.isfinite(trial.val_acc):
            continue
        ranges = {name: getattr(spec.search.space, name) for name in SWEPT}
        if all(ranges[n].low <= v <= ranges[n].high for n, v in trial.swept.items()):
            evaluated.append((trial.swept, trial.val_acc))
    return evaluated


def _stage(spec: SweepSpec, say: Callable[[str], None]) -> tuple[StagedData, ray.ObjectRef]:
    """Stage the data once, in the driver, and share it through the object store."""
    data = stage_dataset(spec.dataset)
    data_ref = ray.put(data)
    say(f"data: {spec.dataset.name} {data.sizes()} staged once in the driver")
    return data, data_ref


def _driver_tags() -> dict[str, str]:
    return {
        tracking.DRIVER_HOST_TAG: socket.gethostname(),
        tracking.DRIVER_PID_TAG: str(os.getpid()),
    }


def _open_parent(
    client: mlflow.MlflowClient,
    experiment_id: str,
    spec: SweepSpec,
    spec_path: str | None,
) -> str:
    """Create the sweep's parent run with the spec, searcher settings, versions and commit."""
    tags = {
        tracking.SWEEP_TAG: spec.name,
        tracking.ROLE_TAG: "sweep",
        "git_commit": tracking.git_commit(),
        **{f"version.{k}": v for k, v in tracking.package_versions().items()},
        **_driver_tags(),
        tracking.NUM_TRIALS_TAG: str(spec.search.num_trials),
    }
    parent_id = client.create_run(experiment_id, tags=tags, run_name=spec.name).info.run_id
    params = {**spec.flat_params(), **searcher_settings(spec)}
    try:
        for chunk in _chunks(list(params.items()), 100):
            client.log_batch(parent_id, params=[mlflow.entities.Param(k, v) for k, v in chunk])
        client.log_text(parent_id, yaml.safe_dump(spec.model_dump(mode="json")), "spec.yaml")
        if spec_path:
            client.log_artifact(parent_id, spec_path, "spec_file")
    except BaseException as error:  # the parent run must not stay RUNNING
        tracking.end_run(client, parent_id, _ended_by(error))
        raise
    return parent_id


def _reopen_parent(
    client: mlflow.MlflowClient, parent_id: str, tags: dict[str, str] | None = None
) -> None:
    """Set an ended (or crashed) sweep's parent run RUNNING again, under this driver."""
    client.update_run(parent_id, status="RUNNING")
    try:
        client.log_batch(
            parent_id,
            tags=[
                mlflow.entities.RunTag(k, v) for k, v in {**_driver_tags(), **(tags or {})}.items()
            ],
        )
    except BaseException as error:
        tracking.end_run(client, parent_id, _ended_by(error))
        raise


def _ended_by(error: BaseException) -> str:
    return "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"


def _tuner(
    spec: SweepSpec,
    wrapped: Any,
    callback: tune.Callback,
    tune_path: str,
    searcher: OptunaSearch,
) -> tune.Tuner:
    return tune.Tuner(
        wrapped,
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            search_alg=searcher,
            scheduler=_scheduler(spec),
            num_samples=spec.search.num_trials,
            max_concurrent_trials=spec.resources.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(
            name=_name_of(tune_path),
            storage_path=_parent_of(tune_path),
            callbacks=[callback],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=spec.storage.checkpoints_to_keep),
            failure_config=tune.FailureConfig(max_failures=0),
            verbose=0,
        ),
    )


def _name_of(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[1]


def _drive(
    sweep: _Sweep,
    data: StagedData,
    data_ref: ray.ObjectRef,
    trainable: Callable[..., None],
    build_tuner: TunerFactory,
) -> SweepResult:
    """Run the sweep's Tune experiment with its parent run open; end every run it touches."""
    spec, client, parent_id, say = sweep.spec, sweep.client, sweep.parent_id, sweep.say
    started = time.perf_counter()
    fixed = TrialConfig.from_spec(spec, dict.fromkeys(SWEPT, math.nan), spec.training.seed)
    settings = {k: v for k, v in fixed.as_params().items() if k not in SWEPT}
    lineage = tracking.TrialLineage(
        client,
        sweep.experiment_id,
        parent_id,
        sweep=spec.name,
        fixed_params=settings,
        swept=SWEPT,
        epochs=spec.training.epochs,
        num_trials=sweep.num_trials,
        progress=say,
    )
    lineage.adopt(sweep.adopted)
    try:
        client.set_tag(parent_id, tracking.TUNE_PATH_TAG, sweep.tune_path)
        resources = {"cpu": spec.resources.cpus_per_trial, "gpu": spec.resources.gpus_per_trial}
        resources.update(spec.resources.custom)
        threads = max(1, int(spec.resources.cpus_per_trial))
        wrapped = tune.with_resources(
            tune.with_parameters(
                trainable, data_refs=[data_ref], settings=settings, threads=threads
            ),
            resources,
        )
        tuner = build_tuner(wrapped, lineage.relay())
    except BaseException as error:  # the parent run must not stay RUNNING
        lineage.release()
        tracking.end_run(client, parent_id, _ended_by(error))
        raise

    # Run. Whatever happens, every run of the sweep ends in a terminal state.
    status, results = "FAILED", None
    stop = _SignalStop(lineage)
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
    previous = {s: signal.getsignal(s) for s in handled} if _main_thread() else {}
    tune_sigint = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    for s in previous:
        if s != signal.SIGUSR1:
            signal.signal(s, stop)
    interrupts.set_closer(lambda: _close_as_killed(sweep, lineage))
    try:
        if stop.name is None:  # else a signal came while the sweep was being set up
            results = tuner.fit()
        status = "KILLED" if stop.name else "FINISHED"
    except (KeyboardInterrupt, _Interrupted):
        status = "KILLED"
    except Exception:
        if stop.name is not None:
            # A second signal landed inside Tune, which may wrap what the handler raised.
            status = "KILLED"
        elif lineage.store_error is None:
            raise
        else:
            status = "FAILED"  # the tracking store stopped answering; reported below
    finally:
        # Closing the record is not interrupted: until every run is closed a signal is only
        # noted (the watchdog of sweeps.interrupts still ends a close that hangs).
        if status == "FINISHED":
            interrupts.trials_ended()
        for s in previous:
            signal.signal(s, interrupts.note)
        try:
            _restore_env("TUNE_DISABLE_SIGINT_HANDLER", tune_sigint)
            lineage.release()
            if status == "KILLED":
                say(f"interrupted ({stop.name or 'SIGINT'}): closing the sweep's MLflow runs")
            # A store that stopped answering gets one quick try per run, not minutes of retries.
            lost = lineage.store_error is not None
            with tracking.quick_http_failures() if lost else contextlib.nullcontext():
                lineage.close_open("interrupted")
                counts = lineage.counts()
                seconds = sweep.seconds_before + time.perf_counter() - started
                summary = {f"trials_{k}": v for k, v in counts.items()}
                tracking.log_summary(client, parent_id, {**summary, "sweep_seconds": seconds})
                if status != "FINISHED":
                    tracking.end_run(client, parent_id, status)
                    tracking.close_stale_runs(client, sweep.experiment_id, parent_id)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if status != "FINISHED":
            interrupts.record_closed(f"Continue it: {resume_command(sweep.uri, parent_id)}")

    if lineage.store_error is not None:
        raise tracking.StoreLost(
            f"the tracking store {sweep.uri} stopped answering while trials ran "
            f"({lineage.store_error}), so the sweep was stopped; runs it "
            "could not close may show RUNNING. Once the store answers again, continue the "
            f"sweep:\n  {resume_command(sweep.uri, parent_id)}"
        )
    # A sweep in which no trial trained has failed, whatever Tune says.
    if status == "FINISHED" and not any(counts[o] for o in tracking.TRAINED_OUTCOMES):
        status = "FAILED"
    result = SweepResult(
        sweep.uri,
        sweep.experiment_id,
        parent_id,
        status,
        counts,
        storage_path=_parent_of(sweep.tune_path),
        tune_path=sweep.tune_path,
    )
    try:
        if status == "FINISHED" and results is not None:
            result.best = _log_best(sweep, lineage, results, data)
    except KeyboardInterrupt:
        status = result.status = "KILLED"
        raise
    except Exception as error:  # the trials' record stands even if the best model cannot be kept
        log.exception("the best model could not be logged")
        say(f"warning: the best model could not be logged: {error}")
    finally:
        tracking.end_run(client, parent_id, status)
        tracking.close_stale_runs(client, sweep.experiment_id, parent_id)
        interrupts.record_closed()
    return result


def extend_command(tracking_uri: str, parent_run_id: str) -> str:
    """The command that adds trials to sweep run `parent_run_id` (N to fill in)."""
    return (
        f"{analysis.sweeps_command()} extend --run-id {parent_run_id} --trials N "
        f"--tracking-uri {tracking_uri}"
    )


def resume_command(tracking_uri: str, parent_run_id: str) -> str:
    """The command that continues sweep run `parent_run_id`, runnable as printed."""
    return (
        f"{analysis.sweeps_command()} resume --run-id {parent_run_id} "
        f"--tracking-uri {tracking_uri}"
    )


def _close_as_killed(sweep: _Sweep, lineage: tracking.TrialLineage) -> None:
    """End the sweep's open runs as KILLED when a stop hangs (the watchdog of interrupts)."""
    lineage.stopping = lineage.stopping or "signal"
    with tracking.quick_http_failures():
        lineage.close_open("interrupted")
        summary = {f"trials_{k}": v for k, v in lineage.counts().items()}
        tracking.log_summary(sweep.client, sweep.parent_id, summary)
        tracking.end_run(sweep.client, sweep.parent_id, "KILLED")
        tracking.close_stale_runs(sweep.client, sweep.experiment_id, sweep.parent_id)


def _main_thread() -> bool:
    """Signal handlers can only be set from the main thread."""
    return threading.current_thread() is threading.main_thread()


def _restore_env(key: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _previous_best(sweep: _Sweep) -> dict[str, Any]:
    """The best trial an earlier driver of this sweep chose and logged; {} if none."""
    parent = sweep.client.get_run(sweep.parent_id)
    tags, metrics = parent.data.tags, parent.data.metrics
    trial_id = tags.get("best_trial_id")
    if not trial_id or "best_val_acc" not in metrics or "best_model_uri" not in tags:
        return {}
    adopted = sweep.adopted.get(trial_id)
    best = {
        "trial_id": trial_id,
        "run_id": tags.get("best_run_id", ""),
        **(adopted.swept if adopted else dict.fromkeys(SWEPT, math.nan)),
        "epochs": adopted.epochs if adopted else 0,
        **{key: metrics.get(f"best_{key}", math.nan) for key in _BEST_METRICS},
        "model_uri": tags["best_model_uri"],
    }
    if "best_registered" in tags:
        best["registered"] = tags["best_registered"]
    return best


_BEST_METRICS = ("val_acc", "val_loss", "test_acc", "test_loss")


def _log_best(
    sweep: _Sweep, lineage: tracking.TrialLineage, results: tune.ResultGrid, data: StagedData
) -> dict[str, Any]:
    """Evaluate the best trial's final weights on validation and test; log it as a model.

    Candidates are the trials that trained (completed or stopped early) and left a checkpoint;
    a diverged, failed or interrupted trial is never the best, whatever it last reported. A
    best model an earlier driver of the sweep logged stays unless a candidate beats it.
    """
    spec, client, parent_id, say = sweep.spec, sweep.client, sweep.parent_id, sweep.say
    candidates = [
        r
        for r in results
        if r.error is None
        and r.checkpoint is not None
        and r.metrics
        and lineage.outcomes.get(r.metrics.get("trial_id")) in tracking.TRAINED_OUTCOMES
        and math.isfinite(float(r.metrics.get(METRIC, math.nan)))
    ]
    previous = _previous_best(sweep)
    if not candidates:
        if not previous:
            say("no trial trained to a finite val_acc: no best model")
        return previous
    best = max(candidates, key=lambda r: float(r.metrics[METRIC]))
    if previous and float(best.metrics[METRIC]) <= previous["val_acc"]:
        say(
            f"no new trial beat trial {previous['trial_id']} (val_acc "
            f"{previous['val_acc']:.4f}): the best model stays {previous['model_uri']}"
        )
        return previous
    trial_id = best.metrics["trial_id"]
    state = load_checkpoint_state(best.checkpoint)
    cfg = TrialConfig(**state["config"])
    model = build_model(cfg, data)
    model.load_state_dict(state["model"])

    # The test split is touched here only, once, for the chosen trial.
    import torch

    device = torch.device("cpu")
    model.to(device)
    val_loss, val_acc = evaluate(model, DeviceSplit(data.val, data, device))
    test_loss, test_acc = evaluate(model, DeviceSplit(data.test, data, device))
    best_info = {
        "trial_id": trial_id,
        "run_id": lineage.run_ids.get(trial_id, ""),
        **{name: getattr(cfg, name) for name in SWEPT},
        "epochs": int(state["epoch"]),
        "val_acc": val_acc,
        "val_loss": val_loss,
        "test_acc": test_acc,
        "test_loss": test_loss,
    }
    now = int(time.time() * 1000)
    client.log_batch(
        parent_id,
        metrics=[
            mlflow.entities.Metric(f"best_{k}", float(best_info[k]), now, 0) for k in _BEST_METRICS
        ],
        tags=[
            mlflow.entities.RunTag("best_trial_id", trial_id),
            mlflow.entities.RunTag("best_run_id", best_info["run_id"]),
        ],
    )
    if best_info["run_id"]:
        client.log_batch(
            best_info["run_id"],
            metrics=[mlflow.entities.Metric("test_acc", test_acc, now, int(state["epoch"]))],
        )

    # The model itself, loadable with mlflow.pytorch.load_model, registered as alias "best".
    mlflow.set_tracking_uri(sweep.uri)
    # MLflow warns on every pickled model; the choice is deliberate (see below).
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    with mlflow.start_run(run_id=parent_id):
        info = mlflow.pytorch.log_model(
            model.eval(),
            name="best_model",
            # Pickle keeps the nn.Module (train/eval modes, stochastic depth) intact on load;
            # it needs regmodels importable wherever the model is loaded.
            serialization_format="pickle",
            input_example=data.val.x[:2].astype("float32"),
            pip_requirements=[],
        )
    best_info["model_uri"] = info.model_uri
    client.set_tag(parent_id, "best_model_uri", info.model_uri)
    if spec.tracking.register_model:
        try:
            version = mlflow.register_model(info.model_uri, spec.name)
            client.set_registered_model_alias(spec.name, "best", str(version.version))
            best_info["registered"] = f"models:/{spec.name}@best"
            client.set_tag(parent_id, "best_registered", best_info["registered"])
        except mlflow.exceptions.MlflowException as error:
            log.warning("best model not registered at %s: %s", sweep.uri, error)
            say(f"this tracking store did not register the model; load it from {info.model_uri}")
    say(
        f"best trial {trial_id}: val_acc={val_acc:.4f} test_acc={test_acc:.4f} "
        f"model {best_info['model_uri']}"
    )
    return best_info
