"""Schedules as pure functions of the optimizer step.

The training guide ("Training Strategies", "Learning Rate Scheduling") gives the shapes:
cosine learning rate with warmup, KL annealing (``get_kl_weight``), free-bits scheduling
(``get_free_bits``) and curriculum phases.  freetf adds a half-cosine ramp and the
cyclical KL schedule of Fu et al. (2019).  Nothing here holds state: the step decides.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from freetf.config import (
    Config,
    CurriculumPhase,
    FreeBitsScheduleConfig,
    KLAnnealingConfig,
)

LRKind = Literal["cosine", "constant"]


def _ramp(step: int, ramp_steps: int) -> float:
    """Progress in [0, 1] after ``step`` of ``ramp_steps`` steps (1 when ramp_steps <= 0)."""
    if ramp_steps <= 0:
        return 1.0
    return min(max(step / ramp_steps, 0.0), 1.0)


def _half_cosine(progress: float) -> float:
    """0 -> 0, 1 -> 1 with zero slope at both ends."""
    return 0.5 * (1.0 - math.cos(math.pi * progress))


def _interpolate(start: float, end: float, progress: float) -> float:
    """The guide's ``initial * (1 - progress) + final * progress``."""
    return start * (1.0 - progress) + end * progress


# ----------------------------------------------------------------------------- learning rate


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float,
          kind: LRKind = "cosine") -> float:
    """Learning rate at ``step`` (the guide's cosine schedule with warmup).

    Linear warmup ``base_lr * (step + 1) / (warmup_steps + 1)`` (starts near 0, reaches
    ``base_lr`` at ``warmup_steps``); then ``cosine`` decays to ``min_lr`` at
    ``total_steps`` and stays there, ``constant`` stays at ``base_lr``.
    """
    if kind not in ("cosine", "constant"):
        raise ValueError(f"scheduler type {kind!r} must be 'cosine' or 'constant'")
    if step < warmup_steps:
        return base_lr * (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return base_lr
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_lr_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                       min_lr: float, kind: LRKind = "cosine"
                       ) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR following ``lr_at`` for each param group's own base lr.

    The base lr is the group's ``initial_lr`` when present (an optimizer restored from a
    checkpoint), else its current ``lr``.  ``min_lr`` is absolute, shared by all groups.
    """
    lr_at(0, 1.0, warmup_steps, total_steps, min_lr, kind)  # validate ``kind`` up front

    def factor(base_lr: float):
        def multiplier(step: int) -> float:
            if base_lr == 0.0:
                return 0.0
            return lr_at(step, base_lr, warmup_steps, total_steps, min_lr, kind) / base_lr
        return multiplier

    lambdas = [factor(float(group.get("initial_lr", group["lr"])))
               for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def load_lr_scheduler_state(scheduler: torch.optim.lr_scheduler.LambdaLR,
                            state: dict) -> None:
    """Restore a saved step count into a scheduler built for this run.

    The optimizer's restored state holds the saved run's last learning rates; they are
    reset to this run's schedule at that step, so a resume with another ``max_steps``
    follows the new schedule from its first step.
    """
    scheduler.load_state_dict(state)
    for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs,
                                   scheduler.lr_lambdas, strict=True):
        group["lr"] = base * factor(scheduler.last_epoch)


# ----------------------------------------------------------------------------- KL and free bits


def kl_weight_at(step: int, total_steps: int, final_weight: float,
                 cfg: KLAnnealingConfig) -> float:
    """KL weight at ``step`` (the guide's ``get_kl_weight``, plus cosine and cyclical).

    ``constant``: ``final_weight``.  ``linear`` / ``cosine``: from ``cfg.initial_weight`` to
    ``final_weight`` over ``cfg.warmup_steps`` (0 = ``total_steps``), then flat.
    ``cyclical`` (Fu et al. 2019): ``cfg.cycles`` cycles of ``ceil(total_steps / cycles)``
    steps, each ramping linearly from ``initial_weight`` to ``final_weight`` over its first
    ``cfg.ratio`` and then holding ``final_weight``; ``final_weight`` after ``total_steps``.
    """
    if cfg.type == "constant":
        return final_weight
    if cfg.type in ("linear", "cosine"):
        progress = _ramp(step, cfg.warmup_steps or total_steps)
        if cfg.type == "cosine":
            progress = _half_cosine(progress)
        return _interpolate(cfg.initial_weight, final_weight, progress)
    if cfg.type == "cyclical":
        if total_steps <= 0 or step >= total_steps:
            return final_weight
        period = math.ceil(total_steps / cfg.cycles)
        position = (step % period) / period  # in [0, 1)
        progress = min(position / cfg.ratio, 1.0)
        return _interpolate(cfg.initial_weight, final_weight, progress)
    raise ValueError(f"training.kl_annealing.type={cfg.type!r} is not supported")


def free_bits_at(step: int, total_steps: int, final_nats: float,
                 cfg: FreeBitsScheduleConfig) -> float:
    """Free-bits threshold (nats per token) at ``step`` (the guide's ``get_free_bits``).

    ``constant``, or ``cfg.initial_nats`` None: ``final_nats``.  ``linear`` / ``cosine``: from
    ``cfg.initial_nats`` to ``final_nats`` over ``cfg.steps`` (0 = ``total_steps``), then flat.
    """
    if cfg.type == "constant" or cfg.initial_nats is None:
        return final_nats
    if cfg.type not in ("linear", "cosine"):
        raise ValueError(f"training.free_bits_schedule.type={cfg.type!r} is not supported")
    progress = _ramp(step, cfg.steps or total_steps)
    if cfg.type == "cosine":
        progress = _half_cosine(progress)
    return _interpolate(cfg.initial_nats, final_nats, progress)


# ----------------------------------------------------------------------------- curriculum


def curriculum_at(step: int, phases: list[CurriculumPhase]) -> CurriculumPhase | None:
    """The phase whose ``until_step`` is the first above ``step``; None after the last
    (meaning: use the base config).  ``phases`` end at increasing steps (config-validated).
    """
    for phase in phases:
        if step < phase.until_step:
            return phase
    return None


def schedule_values(cfg: Config, step: int, total_steps: int) -> dict[str, float | int]:
    """``kl_weight``, ``free_bits_nats`` and ``max_seq_len`` at ``step``.

    A curriculum phase's ``kl_weight`` (when set) replaces ``training.kl_weight`` as the
    target of KL annealing; its ``max_seq_len`` (when set) replaces ``data.max_seq_len``.
    """
    training = cfg.training
    phase = curriculum_at(step, training.curriculum)
    target_kl = training.kl_weight
    max_seq_len = cfg.data.max_seq_len
    if phase is not None and phase.kl_weight is not None:
        target_kl = phase.kl_weight
    if phase is not None and phase.max_seq_len is not None:
        max_seq_len = phase.max_seq_len
    return {
        "kl_weight": kl_weight_at(step, total_steps, target_kl, training.kl_annealing),
        "free_bits_nats": free_bits_at(step, total_steps, training.free_bits_nats,
                                       training.free_bits_schedule),
        "max_seq_len": max_seq_len,
    }
