"""Sweep results as pandas DataFrames, read back from MLflow.

Column names are the same words as the spec's search space and the trials' metrics: dropout,
weight_decay, survival_prob, val_acc, gen_gap, ...
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path

import mlflow
import pandas as pd

from sweeps.spec import SWEPT
from sweeps.tracking import OUTCOME_TAG, PARENT_TAG, ROLE_TAG, SWEEP_TAG

log = logging.getLogger(__name__)

TABLE_COLUMNS = [
    "trial_id",
    *SWEPT,
    "outcome",
    "epochs",
    "val_acc",
    "train_acc",
    "gen_gap",
    "executed_fraction",
    "test_acc",
]


def latest_sweep_run_id(tracking_uri: str, experiment: str) -> str:
    """The run id of the most recent sweep parent run in `experiment`."""
    frame = mlflow.search_runs(
        experiment_names=[experiment],
        filter_string=f"tags.`{ROLE_TAG}` = 'sweep'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if frame.empty:
        raise LookupError(f"experiment {experiment!r} at {tracking_uri} has no sweep runs")
    return str(frame.iloc[0]["run_id"])


def trials_frame(parent_run_id: str, experiment_ids: list[str] | None = None) -> pd.DataFrame:
    """One row per trial of the sweep `parent_run_id`: swept params, final metrics, outcome.

    Uses the tracking URI set with mlflow.set_tracking_uri (or $MLFLOW_TRACKING_URI).
    """
    client = mlflow.MlflowClient()
    if experiment_ids is None:
        experiment_ids = [client.get_run(parent_run_id).info.experiment_id]
    runs = mlflow.search_runs(
        experiment_ids=experiment_ids,
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
    )
    if runs.empty:
        return pd.DataFrame(columns=TABLE_COLUMNS)
    frame = pd.DataFrame(
        {
            "run_id": runs["run_id"],
            "status": runs["status"],
            "trial_id": runs.get("tags.trial_id"),
            "outcome": runs.get(f"tags.{OUTCOME_TAG}"),
        }
    )
    for name in SWEPT:
        frame[name] = pd.to_numeric(runs.get(f"params.{name}"), errors="coerce")
    for name in ("val_acc", "train_acc", "gen_gap", "executed_fraction", "test_acc", "epoch"):
        column = runs.get(f"metrics.{name}")
        frame[name] = math.nan if column is None else pd.to_numeric(column, errors="coerce")
    frame = frame.rename(columns={"epoch": "epochs"})
    frame["epochs"] = frame["epochs"].astype("Int64")
    return frame


def best_trials(frame: pd.DataFrame, top: int = 5, best_run_id: str | None = None) -> pd.DataFrame:
    """The `top` trials by final validation accuracy, best first.

    Among trials tied at the top, `best_run_id` (the parent run's `best_run_id` tag: the trial
    whose model the sweep logged) comes first, so the table and the best model agree.
    """
    chosen = frame["run_id"] == best_run_id if "run_id" in frame else False
    ranked = frame.assign(_chosen=chosen).sort_values(
        ["val_acc", "_chosen"], ascending=False, na_position="last", kind="stable"
    )
    return ranked.head(top)[[c for c in TABLE_COLUMNS if c in ranked.columns]].reset_index(
        drop=True
    )


def at_epoch(frame: pd.DataFrame, epoch: int, keys: tuple[str, ...] = ("val_acc", "gen_gap")):
    """Each trial's metrics at `epoch` (from MLflow's metric history), for trials that got there.

    ASHA stops trials at different epochs, so final metrics compare unequal training; read at
    one epoch that every surviving trial reached (see `comparison_epoch`), they compare like
    with like.
    """
    client = mlflow.MlflowClient()
    rows = []
    for row in frame.itertuples():
        values = {}
        for key in keys:
            history = client.get_metric_history(row.run_id, key)
            values[key] = next((m.value for m in history if m.step == epoch), math.nan)
        if not math.isnan(values[keys[0]]):
            rows.append({"run_id": row.run_id, **{n: getattr(row, n) for n in SWEPT}, **values})
    return pd.DataFrame(rows, columns=["run_id", *SWEPT, *keys])


def comparison_epoch(params: Mapping[str, str], requested: int | None = None) -> tuple[int, str]:
    """The epoch at which to compare a sweep's trials, and why that one.

    `params` are the sweep parent run's MLflow params ("scheduler.name", "training.epochs",
    "scheduler.grace_period", ...). `requested` (an epoch >= 1) wins. Under ASHA the default is
    the first rung, `scheduler.grace_period`: every trial that did not fail reached it. Under
    FIFO no trial is stopped early, so the default is the final epoch, `training.epochs`.
    """
    if requested is not None:
        return requested, "the epoch requested"
    scheduler = params.get("scheduler.name", params.get("scheduler", "asha"))
    if scheduler == "fifo" and params.get("training.epochs"):
        return int(params["training.epochs"]), (
            "the final epoch (training.epochs), as the FIFO scheduler stops no trial early"
        )
    if params.get("scheduler.grace_period"):
        return int(params["scheduler.grace_period"]), (
            "ASHA's first rung (scheduler.grace_period), which every trial that did not fail "
            "reached"
        )
    return 1, "the first epoch, as the sweep run records no scheduler settings"


def epochs_reached(frame: pd.DataFrame) -> str:
    """How far the trials in `frame` got, in words: "the trials reached epochs 2 to 5"."""
    epochs = frame["epochs"].dropna() if "epochs" in frame.columns else pd.Series(dtype="Int64")
    if epochs.empty:
        return "no trial logged an epoch"
    low, high = int(epochs.min()), int(epochs.max())
    if low == high:
        return f"the trials reached epoch {low}"
    return f"the trials reached epochs {low} to {high}"


def effects(frame: pd.DataFrame) -> pd.DataFrame:
    """Spearman rank correlation of each swept value with val_acc and gen_gap, over n trials.

    Pass a frame of trials compared at one epoch (`at_epoch`) or of completed trials only.
    """
    rows = []
    for name in SWEPT:
        rows.append(
            {
                "param": name,
                "n": len(frame),
                "corr_val_acc": frame[name].corr(frame["val_acc"], method="spearman"),
                "corr_gen_gap": frame[name].corr(frame["gen_gap"], method="spearman"),
            }
        )
    return pd.DataFrame(rows)


def importance(frame: pd.DataFrame) -> pd.Series:
    """Optuna's fANOVA importance of each swept value for val_acc over the trials in `frame`.

    The importances sum to 1; with few trials they are rough (n is len(frame)).
    """
    import optuna

    distributions = {
        name: optuna.distributions.FloatDistribution(
            float(frame[name].min()), float(frame[name].max()), log=name == "weight_decay"
        )
        for name in SWEPT
    }
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    for row in frame.itertuples():
        study.add_trial(
            optuna.trial.create_trial(
                params={name: float(getattr(row, name)) for name in SWEPT},
                distributions=distributions,
                value=float(row.val_acc),
            )
        )
    scores = optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
    )
    return pd.Series(scores, name="importance").reindex(list(SWEPT))


def plot_trials(frame: pd.DataFrame, path: str | Path) -> Path:
    """Scatter of val_acc against each swept value, saved as a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SWEPT), figsize=(4 * len(SWEPT), 3.4), sharey=True)
    for ax, name in zip(axes, SWEPT, strict=True):
        for outcome, group in frame.groupby("outcome"):
            ax.scatter(group[name], group["val_acc"], label=str(outcome), s=24)
        ax.set_xlabel(name)
        if name == "weight_decay":
            ax.set_xscale("log")
    axes[0].set_ylabel("final val_acc")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    if not path.suffix:  # as matplotlib would name it, so that the path returned is the file
        path = path.with_suffix(".png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _shown_path(path: Path, cwd: str | Path | None) -> str:
    # Relative to `cwd` (default: the working directory) when below it, else absolute; a bare
    # name would be looked up on PATH, so a file in `cwd` itself gets "./".
    base = Path(os.path.abspath(Path.cwd() if cwd is None else cwd))
    if path.is_relative_to(base):
        shown = path.relative_to(base).as_posix()
        return shlex.quote(shown if "/" in shown else f"./{shown}")
    return shlex.quote(str(path))


def mlflow_executable(cwd: str | Path | None = None) -> str:
    """The shell words that run this Python's MLflow, whether or not its venv is activated.

    The `mlflow` script beside `sys.executable` (the venv's bin), relative to `cwd` (default:
    the working directory) when it lies below it, else absolute; `python -m mlflow` with
    `sys.executable` where there is no such script.
    """
    bin_dir = Path(os.path.abspath(sys.executable)).parent
    script = next(
        (bin_dir / name for name in ("mlflow", "mlflow.exe") if (bin_dir / name).is_file()), None
    )
    if script is None:
        return f"{shlex.quote(sys.executable)} -m mlflow"
    return _shown_path(script, cwd)


def sweeps_command(cwd: str | Path | None = None) -> str:
    """The shell words that run regsweep's CLI with this Python, venv activated or not."""
    return f"{_shown_path(Path(os.path.abspath(sys.executable)), cwd)} -m sweeps"


def ui_command(tracking_uri: str, cwd: str | Path | None = None) -> str:
    """The command that opens the MLflow UI on `tracking_uri`, runnable as printed from `cwd`.

    A relative sqlite path in `tracking_uri` is kept as given: it is right from the working
    directory the sweep was run in.
    """
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} in a browser"
    return (
        f"{mlflow_executable(cwd)} ui --backend-store-uri {shlex.quote(tracking_uri)} "
        "--host 127.0.0.1 --port 5000"
    )


__all__ = [
    "SWEEP_TAG",
    "at_epoch",
    "best_trials",
    "comparison_epoch",
    "effects",
    "epochs_reached",
    "importance",
    "latest_sweep_run_id",
    "mlflow_executable",
    "plot_trials",
    "sweeps_command",
    "trials_frame",
    "ui_command",
]
