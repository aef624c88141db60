"""Run a sweep: preflight, stage data, open lineage, then Tuner(OptunaSearch + ASHA).

The order matters. Everything that can fail cheaply (the tracking store, the storage path, the
cluster's resources) is checked before data is staged or any trial is started, and the parent
run is opened only once all of that has passed. From then on a `finally` block guarantees that
every MLflow run of the sweep ends in a terminal state, however the sweep ends.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable
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

from sweeps import tracking
from sweeps.data import DeviceSplit, stage_dataset
from sweeps.spec import SWEPT, SweepSpec
from sweeps.train import TrialConfig, build_model, evaluate
from sweeps.trainable import load_checkpoint_state, train_trial

log = logging.getLogger(__name__)

# Checkpointing every epoch of short digits trials trips a Tune warning meant for slow remote
# storage; it says nothing useful here.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

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


def _check_local_storage(path: str) -> None:
    if "://" in path:
        return
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as error:
        raise PreflightError(
            f"storage.path {path!r} is not writable ({error.strerror}); choose a directory "
            "you can write, or pass --storage-path"
        ) from None


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


def _searcher(spec: SweepSpec) -> OptunaSearch:
    space = spec.search.space
    distributions = {}
    for name in SWEPT:
        r = getattr(space, name)
        distributions[name] = optuna.distributions.FloatDistribution(r.low, r.high, log=r.log)
    sampler = optuna.samplers.TPESampler(
        seed=spec.search.seed, n_startup_trials=spec.search.n_startup_trials
    )
    return OptunaSearch(space=distributions, metric=METRIC, mode=MODE, sampler=sampler)


def _scheduler(spec: SweepSpec) -> ASHAScheduler | FIFOScheduler:
    if spec.scheduler.name == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="training_iteration",
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
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
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
        self.name: str | None = None
        self.usr1_before = signal.getsignal(signal.SIGUSR1)

    def __call__(self, signum: int, frame: Any) -> None:
        first = self.name is None
        self.name = self.name or signal.Signals(signum).name
        self.lineage.stopping = self.name
        tune_stop = signal.getsignal(signal.SIGUSR1)
        if first and callable(tune_stop) and tune_stop is not self.usr1_before:
            tune_stop(signum, frame)
            return
        raise _Interrupted(self.name)


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
    say = progress or (lambda line: None)
    uri = resolve_tracking_uri(spec, tracking_uri)
    storage = resolve_storage(spec, storage_path)

    # Preflight: the tracking store and the storage path, before Ray starts.
    try:
        client, experiment_id = tracking.open_experiment(uri, spec.experiment)
    except tracking.TrackingError as error:
        raise PreflightError(str(error)) from None
    _check_local_storage(storage)

    started_ray = _init_ray(address)
    try:
        alive = sum(1 for node in ray.nodes() if node.get("Alive"))
        check_shared_storage(storage, spec.storage.shared, alive)
        _check_resources(spec, local=started_ray, say=say)
        say(f"ray: {ray.cluster_resources()}; tracking: {uri}; storage: {storage}")
        return _run(spec, spec_path, client, uri, experiment_id, storage, say, trainable)
    finally:
        if started_ray:
            ray.shutdown()


def _run(
    spec: SweepSpec,
    spec_path: str | None,
    client: mlflow.MlflowClient,
    uri: str,
    experiment_id: str,
    storage: str,
    say: Callable[[str], None],
    trainable: Callable[..., None],
) -> SweepResult:
    # Stage the data once and share it through the object store.
    started = time.perf_counter()
    data = stage_dataset(spec.dataset)
    data_ref = ray.put(data)
    say(f"data: {spec.dataset.name} {data.sizes()} staged once in the driver")

    # The sweep's parent run: spec, searcher settings, versions, commit.
    tags = {
        tracking.SWEEP_TAG: spec.name,
        tracking.ROLE_TAG: "sweep",
        "git_commit": tracking.git_commit(),
        **{f"version.{k}": v for k, v in tracking.package_versions().items()},
    }
    parent = client.create_run(experiment_id, tags=tags, run_name=spec.name)
    parent_id = parent.info.run_id
    params = {**spec.flat_params(), **searcher_settings(spec)}
    try:
        for chunk in _chunks(list(params.items()), 100):
            client.log_batch(parent_id, params=[mlflow.entities.Param(k, v) for k, v in chunk])
        client.log_text(parent_id, yaml.safe_dump(spec.model_dump(mode="json")), "spec.yaml")
        if spec_path:
            client.log_artifact(parent_id, spec_path, "spec_file")

        fixed = TrialConfig.from_spec(spec, dict.fromkeys(SWEPT, math.nan), spec.training.seed)
        settings = {k: v for k, v in fixed.as_params().items() if k not in SWEPT}
        lineage = tracking.TrialLineage(
            client,
            experiment_id,
            parent_id,
            sweep=spec.name,
            fixed_params=settings,
            swept=SWEPT,
            epochs=spec.training.epochs,
            num_trials=spec.search.num_trials,
            progress=say,
        )
        resources = {"cpu": spec.resources.cpus_per_trial, "gpu": spec.resources.gpus_per_trial}
        resources.update(spec.resources.custom)
        threads = max(1, int(spec.resources.cpus_per_trial))
        tuner = tune.Tuner(
            tune.with_resources(
                tune.with_parameters(
                    trainable, data_refs=[data_ref], settings=settings, threads=threads
                ),
                resources,
            ),
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode=MODE,
                search_alg=_searcher(spec),
                scheduler=_scheduler(spec),
                num_samples=spec.search.num_trials,
                max_concurrent_trials=spec.resources.max_concurrent_trials,
            ),
            run_config=tune.RunConfig(
                name=f"{spec.name}-{parent_id[:8]}",
                storage_path=storage,
                callbacks=[lineage],
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=spec.storage.checkpoints_to_keep
                ),
                failure_config=tune.FailureConfig(max_failures=0),
                verbose=0,
            ),
        )
    except BaseException as error:  # the parent run must not stay RUNNING
        killed = isinstance(error, KeyboardInterrupt)
        tracking.end_run(client, parent_id, "KILLED" if killed else "FAILED")
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
    try:
        results = tuner.fit()
        status = "KILLED" if stop.name else "FINISHED"
    except (KeyboardInterrupt, _Interrupted):
        status = "KILLED"
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _restore_env("TUNE_DISABLE_SIGINT_HANDLER", tune_sigint)
        if status == "KILLED":
            say(f"interrupted ({stop.name or 'SIGINT'}): closing the sweep's MLflow runs")
        lineage.close_open("interrupted")
        counts = lineage.counts()
        summary = {f"trials_{k}": v for k, v in counts.items()}
        tracking.log_summary(
            client, parent_id, {**summary, "sweep_seconds": time.perf_counter() - started}
        )
        if status != "FINISHED":
            tracking.end_run(client, parent_id, status)
            tracking.close_stale_runs(client, experiment_id, parent_id)

    result = SweepResult(uri, experiment_id, parent_id, status, counts, storage_path=storage)
    try:
        if status == "FINISHED" and results is not None:
            result.best = _log_best(spec, client, uri, parent_id, lineage, results, data, say)
    except KeyboardInterrupt:
        status = result.status = "KILLED"
        raise
    except Exception as error:  # the trials' record stands even if the best model cannot be kept
        log.exception("the best model could not be logged")
        say(f"warning: the best model could not be logged: {error}")
    finally:
        tracking.end_run(client, parent_id, status)
        tracking.close_stale_runs(client, experiment_id, parent_id)
    return result


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


def _log_best(spec, client, uri, parent_id, lineage, results, data, say) -> dict[str, Any]:
    """Evaluate the best trial's final weights on validation and test; log it as a model.

    Candidates are the trials that trained (completed or stopped early) and left a checkpoint;
    a diverged, failed or interrupted trial is never the best, whatever it last reported.
    """
    trained = ("completed", "stopped_early")
    candidates = [
        r
        for r in results
        if r.error is None
        and r.checkpoint is not None
        and r.metrics
        and lineage.outcomes.get(r.metrics.get("trial_id")) in trained
        and math.isfinite(float(r.metrics.get(METRIC, math.nan)))
    ]
    if not candidates:
        say("no trial trained to a finite val_acc: no best model")
        return {}
    best = max(candidates, key=lambda r: float(r.metrics[METRIC]))
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
            mlflow.entities.Metric(f"best_{k}", float(best_info[k]), now, 0)
            for k in ("val_acc", "val_loss", "test_acc", "test_loss")
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
    mlflow.set_tracking_uri(uri)
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
    if spec.tracking.register_model:
        try:
            version = mlflow.register_model(info.model_uri, spec.name)
            client.set_registered_model_alias(spec.name, "best", str(version.version))
            best_info["registered"] = f"models:/{spec.name}@best"
        except mlflow.exceptions.MlflowException as error:
            log.warning("best model not registered at %s: %s", uri, error)
            say(f"this tracking store did not register the model; load it from {info.model_uri}")
    say(
        f"best trial {trial_id}: val_acc={val_acc:.4f} test_acc={test_acc:.4f} "
        f"model {best_info['model_uri']}"
    )
    return best_info
