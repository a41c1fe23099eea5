"""One training run assembled on a ComfyUI model, for the Train Diff2Flow LoRA node and the
headless ``train`` command alike: the alignment, the LoRA metadata, the widened first convolution
of a depth model, the adapters as weight wrappers on a clone, the ``Trainer``, the resume state
and gradient checkpointing, always in this order. What differs between the two callers (their
inputs, progress, files and interruption) stays with them."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import comfy.sd
import torch

from d2f_core import Diff2Flow
from d2f_core.lora import WeightAdapter
from d2f_core.lora_metadata import LoraMetadata
from training.config import TrainConfig
from training.data import TrainingData, grid_share_problem, hold_out, inverted_share_problem, validation_problem
from training.engine import Trainer

from .checkpoints import attach_recommended_sampling, lora_metadata_for
from .depth import is_image_conditioned, widen_model
from .errors import OptionError
from .model_sampling import alignment_of, flow_model_for
from .unet import attach_adapters, gradient_checkpointing, unet_network


@dataclass
class RunData:
    """The training data of a run, what it trains (``"image"``, or ``"depth"``: image + depth
    pairs), for reflow pairs the teacher's guidance (recorded in the LoRA's metadata), and separate
    validation samples (``validation``: the alternative to ``validation_split``, which holds part of
    ``data`` out instead)."""

    data: TrainingData
    task: str = "image"
    teacher_cfg: float | None = None
    validation: TrainingData | None = None


@dataclass
class PreparedRun:
    """A run ready to train: ``model`` is the model trained on (widened for a depth run; the input
    MODEL is never changed), ``metadata(step)`` what its LoRA files record, ``trainer`` the engine
    with its adapters on ``unet`` of ``patcher`` (the clone that carries them as weight wrappers, held
    here so ComfyUI keeps it loaded for the whole run) on ``device``."""

    model: Any
    patcher: Any
    d2f: Diff2Flow
    metadata: Callable[[int], LoraMetadata]
    trainer: Trainer
    unet: torch.nn.Module
    adapters: dict[str, WeightAdapter]
    device: torch.device

    @contextlib.contextmanager
    def training(self) -> Iterator[Trainer]:
        """Where ``trainer.run`` goes: autograd on even inside ComfyUI's inference mode, and the
        UNet's blocks checkpointed when the config asks for it."""
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            gradient_checkpointing(self.unet, self.trainer.config.gradient_checkpointing),
        ):
            yield self.trainer

    def trained_model(self, lora: dict[str, torch.Tensor], metadata: LoraMetadata | None) -> Any:
        """The model trained on with ``lora`` (the saved tensors) loaded as stock loaders do, as the
        flow model the run's objective samples as (``Objective.flow_model``), carrying the LoRA's
        recommended sampling as Diff2Flow Checkpoint Loader's output does."""
        out, _ = comfy.sd.load_lora_for_models(self.model, None, lora, 1.0, 0.0)
        flow = flow_model_for(out, self.trainer.config.objective, self.d2f.zero_terminal_snr)
        if metadata is not None:
            attach_recommended_sampling(flow, metadata, f"the trained LoRA (objective {metadata.objective})")
        return flow


def prepare_run(
    model: Any,
    config: TrainConfig,
    build_data: Callable[[], RunData],
    *,
    state: dict | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> PreparedRun:
    """Assemble a training run of ``config`` for the ComfyUI ``model`` on the data ``build_data()``
    returns for it; that is called once the options are known to fit the model, so an option the
    model cannot take (a :class:`OptionError` naming it) is refused before any data is encoded.

    A depth run (``RunData.task == "depth"``) widens the first convolution unless ``model`` already
    takes an image latent; its metadata names the base model. ``state``: a training state to continue
    exactly. ``rank`` / ``world_size``: this process's shard of every global batch under torchrun."""
    try:
        d2f = alignment_of(model, config.zero_terminal_snr)
    except ValueError as exc:
        raise OptionError("zero_terminal_snr", str(exc)) from exc
    run_data = build_data()
    data, validation = validation_data(config, run_data)
    problem = inverted_share_problem(config.inverted_share, data)
    if problem is not None:
        raise OptionError("inverted_share", problem)
    problem = grid_share_problem(config, run_data.task)
    if problem is not None:
        raise OptionError(*problem)
    # the metadata reads the base model: a depth file loads onto the base, widened the same way
    metadata = lora_metadata_for(model, config, d2f, teacher_cfg=run_data.teacher_cfg, task=run_data.task)
    if run_data.task == "depth" and not is_image_conditioned(model):
        model = widen_model(model)  # a clone: the caller's MODEL is never changed
    # the adapters are created outside ComfyUI's inference mode so that they are trainable tensors
    with torch.inference_mode(False), torch.enable_grad():
        patcher, unet, adapters, device = attach_adapters(model, config)
        trainer = Trainer(unet_network(unet), adapters, d2f, config, data, device, rank, world_size, validation)
        if state is not None:
            trainer.load_state_dict(state)
    return PreparedRun(model, patcher, d2f, metadata, trainer, unet, adapters, device)


def validation_data(config: TrainConfig, run_data: RunData) -> tuple[TrainingData, TrainingData | None]:
    """``(training, validation)`` samples of a run: ``validation_split`` of the data held out, or the
    separate validation samples (refused as ``training.data.validation_problem`` says)."""
    problem = validation_problem(config, run_data.validation is not None)
    if problem is not None:
        raise OptionError(*problem)
    if config.validation_split > 0:
        try:
            return hold_out(run_data.data, config.validation_split)
        except ValueError as exc:
            raise OptionError("validation_split", str(exc)) from exc
    return run_data.data, run_data.validation
