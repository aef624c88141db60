"""One trial: build the model and optimizer, train, evaluate. Plain torch: no Ray, no MLflow.

`run_trial` calls `on_epoch(metrics, state)` after every epoch; the caller decides what to do
with them (the Ray adapter reports and checkpoints). A non-finite training loss ends the trial
with `diverged = 1` in its last metrics rather than an exception: divergence is an outcome of
the hyperparameters, not a bug. A loss far above that of a uniform guess counts as divergence
too (`is_diverged`), since a blown-up run can stay finite for many epochs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

import regmodels
from sweeps.data import DeviceSplit, StagedData
from sweeps.spec import Augment, SweepSpec

log = logging.getLogger(__name__)

EpochCallback = Callable[[dict[str, float], Callable[[], dict[str, Any]]], None]

# The metrics `run_trial` reports after every epoch (see its docstring for their meaning).
EPOCH_METRICS = (
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "gen_gap",
    "epoch_seconds",
    "executed_fraction",
    "expected_executed_fraction",
    "lr",
    "diverged",
    "epoch",
)

# A mean training loss this many times the loss of a uniform guess (ln of the number of
# classes) means the run has blown up, even while it is still finite: at lr 10 a ResNet's loss
# is in the hundreds after one epoch and reaches 1e15 long before it overflows to inf or NaN.
# A healthy run starts near 1x and falls; one that merely fails to learn stays near 1x.
DIVERGED_LOSS_FACTOR = 100.0


def is_diverged(train_loss: float, num_classes: int) -> bool:
    """Whether an epoch's mean training loss says the run has diverged.

    True for a NaN or infinite loss, and for a finite one above DIVERGED_LOSS_FACTOR times
    ln(num_classes), the cross-entropy of a uniform guess.
    """
    return not math.isfinite(train_loss) or train_loss > DIVERGED_LOSS_FACTOR * math.log(
        num_classes
    )


@dataclass(frozen=True)
class TrialConfig:
    """Everything one trial needs, flat, so that it is also the trial's MLflow params.

    The three swept values use the same names as the spec's search space, the Optuna
    parameters and the MLflow params: dropout (rate before the classifier, [0, 1)),
    weight_decay (per-step coefficient in the sense of weight_decay_mode) and survival_prob
    (final survival probability p_L, (0, 1]).
    """

    dropout: float
    weight_decay: float
    survival_prob: float
    model: str = "resnet20"
    width: int = 1
    shortcut: str = "A"
    block_dropout: float = 0.0
    drop_mode: str = "batch"
    epochs: int = 15
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.1
    lr_schedule: str = "step"
    lr_milestones: tuple[float, ...] = (0.5, 0.75)
    lr_gamma: float = 0.1
    warmup_epochs: int = 0
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay_mode: str = "coupled"
    decay_norm_and_bias: bool = False
    label_smoothing: float = 0.0
    crop_padding: int = 0
    flip: bool = False
    seed: int = 0
    device: str = "auto"
    channels_last: bool = False
    bf16: bool = False

    @classmethod
    def from_spec(cls, spec: SweepSpec, swept: dict[str, float], seed: int) -> TrialConfig:
        t, m = spec.training, spec.model
        return cls(
            dropout=float(swept["dropout"]),
            weight_decay=float(swept["weight_decay"]),
            survival_prob=float(swept["survival_prob"]),
            model=m.name,
            width=m.width,
            shortcut=m.shortcut,
            block_dropout=m.block_dropout,
            drop_mode=m.drop_mode,
            epochs=t.epochs,
            batch_size=t.batch_size,
            optimizer=t.optimizer,
            lr=t.lr,
            lr_schedule=t.lr_schedule,
            lr_milestones=tuple(t.lr_milestones),
            lr_gamma=t.lr_gamma,
            warmup_epochs=t.warmup_epochs,
            momentum=t.momentum,
            nesterov=t.nesterov,
            weight_decay_mode=t.weight_decay_mode,
            decay_norm_and_bias=t.decay_norm_and_bias,
            label_smoothing=t.label_smoothing,
            crop_padding=spec.dataset.augment.crop_padding,
            flip=spec.dataset.augment.flip,
            seed=seed,
            device=t.device,
            channels_last=t.channels_last,
            bf16=t.bf16,
        )

    def as_params(self) -> dict[str, Any]:
        return asdict(self)


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("training.device is 'cuda' but this worker sees no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


def build_model(cfg: TrialConfig, data: StagedData) -> regmodels.CifarResNet:
    return regmodels.create_model(
        cfg.model,
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        dropout=cfg.dropout,
        survival_prob=cfg.survival_prob,
        block_dropout=cfg.block_dropout,
        width=cfg.width,
        shortcut=cfg.shortcut,
        drop_mode=cfg.drop_mode,
    )


def lr_factor(cfg: TrialConfig, epoch: float) -> float:
    """Learning-rate multiplier at a (fractional) epoch counted from 0."""
    if cfg.warmup_epochs and epoch < cfg.warmup_epochs:
        return (epoch + 1e-3) / cfg.warmup_epochs
    progress = epoch / cfg.epochs
    if cfg.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.lr_schedule == "step":
        return cfg.lr_gamma ** sum(progress >= m for m in cfg.lr_milestones)
    return 1.0


def _autocast(cfg: TrialConfig | None, device: torch.device) -> contextlib.AbstractContextManager:
    if cfg is not None and cfg.bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    split: DeviceSplit,
    batch_size: int = 1024,
    cfg: TrialConfig | None = None,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of `model` in eval mode over a whole split."""
    model.eval()
    device = split.x.device
    total_loss, correct = 0.0, 0
    for x, y in split.batches(batch_size):
        if cfg is not None and cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(cfg, device):
            logits = model(x)
        total_loss += F.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    return total_loss / len(split), correct / len(split)


def run_trial(
    cfg: TrialConfig,
    data: StagedData,
    on_epoch: EpochCallback,
    resume: dict[str, Any] | None = None,
) -> None:
    """Train `cfg` on `data` for cfg.epochs, calling `on_epoch` after each epoch.

    Metrics per epoch: train_loss, train_acc, val_loss, val_acc, gen_gap (train_acc -
    val_acc), epoch_seconds, executed_fraction (residual branches actually run),
    expected_executed_fraction (mean of the survival schedule), lr and diverged (0 or 1).
    `resume` is a state returned through `on_epoch`, to continue from its epoch.
    """
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)

    # Model, optimizer, data on the device.
    model = build_model(cfg, data).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = regmodels.build_optimizer(
        model,
        name=cfg.optimizer,  # type: ignore[arg-type]
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        decay_mode=cfg.weight_decay_mode,  # type: ignore[arg-type]
        decay_norm_and_bias=cfg.decay_norm_and_bias,
    )
    augment = Augment(crop_padding=cfg.crop_padding, flip=cfg.flip)
    train = DeviceSplit(data.train, data, device, augment=augment)
    val = DeviceSplit(data.val, data, device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    expected = regmodels.expected_executed_fraction(model.survival_probs)

    start_epoch = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        generator.set_state(resume["generator"])
        torch.set_rng_state(resume["cpu_rng"])
        start_epoch = int(resume["epoch"])

    steps_per_epoch = max(1, len(train) // cfg.batch_size)
    for epoch in range(start_epoch, cfg.epochs):
        started = time.perf_counter()
        model.train()
        regmodels.reset_executed_counts(model)
        # Sums stay on the device: one synchronization per epoch, not per step, so that a GPU
        # never waits for the host. Divergence is therefore seen at the end of the epoch.
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0

        # One pass over the training split, learning rate set per step.
        for step, (x, y) in enumerate(train.batches(cfg.batch_size, generator)):
            lr = cfg.lr * lr_factor(cfg, epoch + step / steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(cfg, device):
                logits = model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)

        train_loss, train_acc = loss_sum.item() / seen, correct.item() / seen
        diverged = is_diverged(train_loss, data.num_classes)
        executed = regmodels.executed_fraction(model)
        if not diverged:
            val_loss, val_acc = evaluate(model, val, cfg=cfg)
            diverged = not math.isfinite(val_loss)
        if diverged:
            # A diverged network is not evaluated (or its evaluation overflowed): its val_acc
            # is reported as 0 so that the searcher and the scheduler rank it last.
            metrics = {
                "train_loss": train_loss,
                "train_acc": train_acc,
                "val_loss": float("nan"),
                "val_acc": 0.0,
                "gen_gap": float("nan"),
                "diverged": 1.0,
            }
        else:
            metrics = {
                "train_loss": train_loss,
                "train_acc": train_acc,
                "val_loss": val_loss,
                "val_acc": val_acc,
                "gen_gap": train_acc - val_acc,
                "diverged": 0.0,
            }
        if device.type == "cuda":
            torch.cuda.synchronize()
        metrics.update(
            epoch=float(epoch + 1),
            epoch_seconds=time.perf_counter() - started,
            executed_fraction=executed,
            expected_executed_fraction=expected,
            lr=lr,
        )
        log.debug("epoch %d: %s", epoch + 1, metrics)

        def state(epoch: int = epoch) -> dict[str, Any]:
            return {
                "epoch": epoch + 1,
                "config": cfg.as_params(),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(),
                "cpu_rng": torch.get_rng_state(),
            }

        on_epoch(metrics, state)
        if diverged:
            return
