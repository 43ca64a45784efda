"""Ignite handler that switches training phases at configured epochs: which parameter groups train
(partial unfreezing) and how much the segmentation and attention losses weigh."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import torch
from ignite.engine import Engine, Events
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["TrainingPhases", "lr_factor"]

LR_SCHEDULES = ("constant", "cosine", "poly")


def lr_factor(schedule: str, progress: float) -> float:
    """Multiplier of the base learning rates at ``progress`` (0 at the first iteration, 1 after the last).

    ``constant``: 1. ``cosine``: ``0.5 * (1 + cos(pi * progress))``. ``poly``: ``(1 - progress) ** 0.9``
    (nnU-Net's decay).
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    t = min(max(float(progress), 0.0), 1.0)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "poly":
        return (1.0 - t) ** 0.9
    return 1.0


def _freeze_stats_of_frozen_norm(module: _BatchNorm, args) -> None:
    """Forward pre-hook: a BatchNorm whose affine weights do not train runs in eval mode (no running-stat update)."""
    if module.training and module.weight is not None and not module.weight.requires_grad:
        module.training = False


class TrainingPhases:
    """Switch phases at the start of configured epochs.

    Each phase is a mapping with ``name``, ``start_epoch`` (1-based), ``trainable`` (module prefixes
    such as ``attention``, ``decoder``, ``backbone.layer4``; ``backbone`` means all of it),
    ``seg_scale`` (multiplier of the mask losses; 0 in the attention warm-up) and
    ``attention_weight``. Parameters outside ``trainable`` get ``requires_grad=False`` and an optimizer
    group none of whose parameters trains gets learning rate 0 (exact freezing, also under DDP);
    the others get back their ``base_lr`` (times the schedule's factor, below). The frozen prior head is never touched.

    ``lr_schedule`` decays the learning rates of the training groups over the whole run, across phases,
    set before every iteration: ``constant`` (no decay, the recipe up to 0.7.x), ``cosine`` or ``poly``
    (see ``lr_factor``); the run's length is the engine's ``max_epochs`` times its epoch length.

    A BatchNorm layer whose own weights are frozen also keeps its running statistics: a forward
    pre-hook puts it in eval mode while its weights do not train (the trainer calls ``network.train()``
    every iteration, which would otherwise let the statistics of pretrained, frozen layers drift).

    Args:
        network: the network (a DDP wrapper is unwrapped).
        optimizer: optimizer built from ``scripts.network.param_groups``.
        loss: the ``FusionSegLoss`` whose ``seg_scale`` / ``attention_weight`` are set.
        phases: the phases, any order; the first must start at epoch 1.
        lr_schedule: ``constant`` (default), ``cosine`` or ``poly``.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss: torch.nn.Module,
        phases: Sequence[Mapping],
        lr_schedule: str = "constant",
    ) -> None:
        lr_factor(lr_schedule, 0.0)  # refuses an unknown schedule before training starts
        self.lr_schedule = lr_schedule
        self.network = getattr(network, "module", network)
        self.optimizer = optimizer
        self.loss = loss
        self.phases = sorted((dict(p) for p in phases), key=lambda p: int(p["start_epoch"]))
        if not self.phases or int(self.phases[0]["start_epoch"]) != 1:
            raise ValueError("phases: the first phase must have start_epoch 1")
        self.current: str | None = None
        self.logger = logging.getLogger(__name__)
        for m in self.network.modules():
            if isinstance(m, _BatchNorm) and not getattr(m, "_frozen_stats_hook", False):
                m.register_forward_pre_hook(_freeze_stats_of_frozen_norm)
                m._frozen_stats_hook = True

    def attach(self, engine: Engine) -> None:
        """Apply the phase of each epoch when it starts, and the learning-rate schedule before each iteration."""
        engine.add_event_handler(Events.EPOCH_STARTED, self)
        if self.lr_schedule != "constant":
            engine.add_event_handler(Events.ITERATION_STARTED, self.schedule)

    def schedule(self, engine: Engine) -> None:
        """Set the training groups' learning rates to ``base_lr`` times the schedule's factor."""
        epoch_length = engine.state.epoch_length or 1
        total = max(int(engine.state.max_epochs or 1) * epoch_length, 1)
        factor = lr_factor(self.lr_schedule, (engine.state.iteration - 1) / total)
        for group in self.optimizer.param_groups:
            if any(p.requires_grad for p in group["params"]):  # frozen groups keep lr 0
                group["lr"] = group.get("base_lr", group["lr"]) * factor

    def phase_for(self, epoch: int) -> dict:
        """The phase in force at ``epoch`` (1-based)."""
        active = self.phases[0]
        for p in self.phases:
            if int(p["start_epoch"]) <= epoch:
                active = p
        return active

    def apply(self, phase: Mapping) -> None:
        """Set trainable parameters, group learning rates and loss weights of ``phase``."""
        prefixes = tuple(str(t).rstrip(".") for t in phase.get("trainable", []))

        def trains(name: str) -> bool:
            return any(name == t or name.startswith(t + ".") for t in prefixes) or (
                "backbone.stem" in prefixes and name.startswith(("backbone.conv1.", "backbone.bn1."))
            )

        by_param: dict[int, bool] = {}
        for name, p in self.network.named_parameters():
            if name.startswith("prior."):
                continue
            on = trains(name)
            p.requires_grad_(on)
            by_param[id(p)] = on
        for group in self.optimizer.param_groups:
            on = any(by_param.get(id(p), False) for p in group["params"])
            group["lr"] = group.get("base_lr", group["lr"]) if on else 0.0
        if "seg_scale" in phase:
            self.loss.seg_scale = float(phase["seg_scale"])
        if "attention_weight" in phase:
            self.loss.attention_weight = float(phase["attention_weight"])
        self.current = str(phase.get("name", ""))

    def __call__(self, engine: Engine) -> None:
        phase = self.phase_for(engine.state.epoch)
        if phase.get("name") != self.current:
            self.apply(phase)
            n = sum(p.numel() for p in self.network.parameters() if p.requires_grad)
            self.logger.info(
                f"epoch {engine.state.epoch}: phase '{self.current}' (trainable {list(phase.get('trainable', []))}, "
                f"{n} parameters; seg_scale {self.loss.seg_scale}, attention_weight {self.loss.attention_weight})"
            )
