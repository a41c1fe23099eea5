"""The Diff2Flow training engine, shared by the ComfyUI node and the headless trainer.

    config   TrainConfig: every training option, validated with errors that name the option
    data     TrainingData: latents + per-sample conditioning, deterministic batching
    engine   Trainer: the optimisation loop (objectives from d2f_core, accumulation, LR schedule,
             mixed precision, NaN guard, cancel, periodic saves, exact resume)
    files    atomic LoRA / training-state files with Diff2Flow metadata
    pairs    reflow pairs: a teacher's ODE from per-index noise into shards, and their TrainingData

It never imports ComfyUI: the caller hands it a network ``net(x_in, timestep, **cond)`` whose
trainable weights are :mod:`d2f_core.lora` adapters.
"""

from .config import TrainConfig
from .data import TrainingData
from .engine import Trainer, TrainingError, TrainResult

__all__ = ["TrainConfig", "TrainingData", "Trainer", "TrainingError", "TrainResult"]
