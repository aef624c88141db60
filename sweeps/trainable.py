"""The Ray Tune adapter around `sweeps.train`: report, checkpoint, restore.

A trial gets the staged dataset as a Ray object reference and its settings as a dict; it never
opens dataset files and never talks to MLflow. Each epoch it reports its metrics to Tune with a
checkpoint (model, optimizer and random state) written to the sweep's storage path, and it
resumes from the latest checkpoint when Tune restores it.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from sweeps.data import StagedData, loads_in_process
from sweeps.spec import SWEPT
from sweeps.train import TrialConfig, pick_device, run_trial

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"


def load_checkpoint_state(checkpoint: tune.Checkpoint) -> dict[str, Any]:
    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=False)


def train_trial(
    config: dict[str, Any],
    *,
    data_refs: list[ray.ObjectRef],
    settings: dict[str, Any],
    threads: int,
) -> None:
    """Tune function trainable: one trial of `settings` with the swept values of `config`.

    `data_refs` holds one reference to the staged dataset. It is wrapped in a list because
    Tune resolves a bare reference passed through `tune.with_parameters` before the trial
    sees it; the list keeps the fetch explicit, here, from the object store.
    """
    torch.set_num_threads(threads)
    data: StagedData = ray.get(data_refs[0])
    cfg = TrialConfig(**{**settings, **{name: config[name] for name in SWEPT}})
    device = pick_device(cfg.device)
    where = {
        "hostname": socket.gethostname(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "device": str(device),
    }
    if device.type == "cuda":
        where["device"] = f"cuda:{torch.cuda.current_device()} {torch.cuda.get_device_name()}"

    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        resume = load_checkpoint_state(checkpoint)
        log.info("trial resumes after epoch %s", resume["epoch"])

    def on_epoch(metrics: dict[str, float], state: Any) -> None:
        result = {**metrics, **where, "data_loads_in_worker": float(loads_in_process())}
        with tempfile.TemporaryDirectory() as directory:
            torch.save(state(), os.path.join(directory, STATE_FILE))
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(directory))

    run_trial(cfg, data, on_epoch, resume=resume)
