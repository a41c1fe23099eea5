"""Node inputs generated from the option registries of ``training.config`` (``TrainConfig``,
``PairsConfig``): one input per option, with the option's name, default, choices, range and help."""
from __future__ import annotations

from comfy_api.latest import io

from training.config import OptionSpec, available_choices


def config_input(spec: OptionSpec) -> io.Input:
    """The node input of one TrainConfig option (its name, default, choices, range and help)."""
    if spec.choices is not None:
        return io.Combo.Input(spec.name, options=list(available_choices(spec)), default=spec.default, tooltip=spec.help)
    if spec.type is bool:
        return io.Boolean.Input(spec.name, default=spec.default, tooltip=spec.help)
    if spec.type is int:
        # a training seed stays fixed: no "control after generate" (it would change the seed of a
        # resumed run and of every re-queue)
        extra = {"control_after_generate": False} if spec.name == "seed" else {}
        return io.Int.Input(spec.name, default=spec.default, min=spec.min, max=spec.max, tooltip=spec.help, **extra)
    return io.Float.Input(spec.name, default=spec.default, min=spec.min, max=spec.max, step=spec.step, round=False,
                          tooltip=spec.help)
