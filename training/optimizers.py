"""The optimizer registry: every choice of ``TrainConfig.optimizer``, its description and the package it
needs. Each one comes from torch or a maintained package, never written here; a choice whose package is
missing is hidden from the node and refused by the CLI with the install command (:func:`build_optimizer`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Optimizer", "OPTIMIZERS", "available_optimizers", "build_optimizer"]

Params = list[torch.nn.Parameter]


@dataclass(frozen=True)
class Optimizer:
    """One optimizer choice: ``build(params, lr, weight_decay)``; ``module`` is the import that must
    succeed, ``"module:attribute"`` where an attribute must exist too (``None``: always there), and
    ``package`` what ``pip install`` names; ``default_learning_rate`` the package's documented default ``lr``."""

    name: str
    description: str
    build: Callable[[Params, float, float], torch.optim.Optimizer]
    module: str | None = None
    package: str | None = None
    # schedule-free: the optimizer keeps two weight sequences and switches between them with its train() /
    # eval(); the evaluation weights are the ones to save, sample and average (training.engine.Trainer)
    schedule_free: bool = False
    # the learning rate the package documents as its default (its constructor's ``lr``), the scale to start
    # from: benchmarks/optimizers.py measures each choice at it; training/tests/test_optimizers.py checks it
    # against the installed package's signature
    default_learning_rate: float | None = None

    def missing(self) -> str | None:
        """Why this installation cannot run it (``None`` when it can)."""
        if self.module is None:
            return None
        module, _, attribute = self.module.partition(":")
        try:
            imported = importlib.import_module(module)
        except ImportError:
            imported = None
        found = imported is not None and (not attribute or hasattr(imported, attribute))
        return None if found else f"optimizer {self.name} needs {self.package}: pip install '{self.package}'"


def _bnb_adamw8bit(params: Params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)


def _adafactor(params: Params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.Adafactor(params, lr=lr, weight_decay=weight_decay)


def _lion(params: Params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    from lion_pytorch import Lion

    return Lion(params, lr=lr, weight_decay=weight_decay)


def _prodigy(params: Params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    from prodigyopt import Prodigy

    return Prodigy(params, lr=lr, weight_decay=weight_decay)


def _adamw_schedule_free(params: Params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    from schedulefree import AdamWScheduleFree

    return AdamWScheduleFree(params, lr=lr, weight_decay=weight_decay)


OPTIMIZERS: dict[str, Optimizer] = {
    o.name: o
    for o in (
        Optimizer(
            "AdamW",
            "Adam with decoupled weight decay (torch)",
            lambda p, lr, wd: torch.optim.AdamW(p, lr=lr, weight_decay=wd),
            default_learning_rate=1e-3,  # torch.optim.AdamW(lr=1e-3)
        ),
        Optimizer(
            "Adam",
            "Adam without weight decay (torch)",
            lambda p, lr, wd: torch.optim.Adam(p, lr=lr),
            default_learning_rate=1e-3,  # torch.optim.Adam(lr=1e-3)
        ),
        Optimizer(
            "SGD",
            "SGD with momentum 0.9 (torch)",
            lambda p, lr, wd: torch.optim.SGD(p, lr=lr, momentum=0.9, weight_decay=wd),
            default_learning_rate=1e-3,  # torch.optim.SGD(lr=1e-3) (older torch releases required lr)
        ),
        Optimizer(
            "AdamW8bit",
            "AdamW with 8-bit states (bitsandbytes): less optimizer memory",
            _bnb_adamw8bit,
            "bitsandbytes",
            "bitsandbytes",
            # bitsandbytes.optim.AdamW8bit(lr=1e-3): its reference docs (not installed here, so not tested)
            default_learning_rate=1e-3,
        ),
        Optimizer(
            "Adafactor",
            "Adafactor (torch, default learning rate 1e-2): factored second moments, little optimizer memory",
            _adafactor,
            "torch.optim:Adafactor",
            "torch>=2.5",
            default_learning_rate=1e-2,  # torch.optim.Adafactor(lr=1e-2)
        ),
        Optimizer(
            "Lion",
            "Lion (lion-pytorch): sign updates, one state; use a 3-10x smaller learning rate than AdamW "
            "(its default 1e-4)",
            _lion,
            "lion_pytorch",
            "lion-pytorch",
            default_learning_rate=1e-4,  # lion_pytorch.Lion(lr=1e-4)
        ),
        Optimizer(
            "Prodigy",
            "Prodigy (prodigyopt): estimates the step size itself; set learning_rate 1 (its default)",
            _prodigy,
            "prodigyopt",
            "prodigyopt",
            default_learning_rate=1.0,  # prodigyopt.Prodigy(lr=1.0): a multiplier of its own step-size estimate
        ),
        Optimizer(
            "AdamWScheduleFree",
            "schedule-free AdamW (schedulefree, default learning rate 0.0025): no decay schedule needed (lr_schedule "
            "constant; warmup_steps still apply); saves, previews and EMA use its evaluation weights",
            _adamw_schedule_free,
            "schedulefree",
            "schedulefree",
            schedule_free=True,
            default_learning_rate=0.0025,  # schedulefree.AdamWScheduleFree(lr=0.0025)
        ),
    )
}


def available_optimizers() -> tuple[str, ...]:
    """The optimizer names this installation can run (the node's combo)."""
    return tuple(name for name, o in OPTIMIZERS.items() if o.missing() is None)


def build_optimizer(name: str, params: Params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``params``; ``ValueError`` with the install command when its package
    is missing."""
    record = OPTIMIZERS[name]
    reason = record.missing()
    if reason is not None:
        raise ValueError(f"{reason}; or choose {', '.join(available_optimizers())}")
    return record.build(params, lr, weight_decay)
