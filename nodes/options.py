"""Node inputs generated from the option registries of ``training.config`` (``TrainConfig``,
``PairsConfig``): one input per option, with the option's name, default, choices, range and help."""

from __future__ import annotations

from comfy_api.latest import io

from training.config import OptionSpec, available_choices


def config_input(spec: OptionSpec, optional: bool = False) -> io.Input:
    """The node input of one option of a config class (``option_specs(TrainConfig)`` or
    ``option_specs(PairsConfig)``): its name, default, choices, range, UI step and help. ``optional``:
    an input that saved API-format prompts may lack, so that such prompts validate (the node then uses
    the option's default)."""
    if spec.choices is not None:
        return io.Combo.Input(
            spec.name, options=list(available_choices(spec)), default=spec.default, tooltip=spec.help, optional=optional
        )
    if spec.type is bool:
        return io.Boolean.Input(spec.name, default=spec.default, tooltip=spec.help, optional=optional)
    if spec.type is str:
        return io.String.Input(spec.name, default=spec.default, tooltip=spec.help, optional=optional)
    if spec.type is int:
        # a training or pairs seed stays fixed: no "control after generate" (it would change the seed of a
        # resumed run, and the pairs of a rerun, at every re-queue)
        extra = {"control_after_generate": False} if spec.name == "seed" else {}
        if spec.step is not None:
            extra["step"] = int(spec.step)
        return io.Int.Input(
            spec.name, default=spec.default, min=spec.min, max=spec.max, tooltip=spec.help, optional=optional, **extra
        )
    return io.Float.Input(
        spec.name,
        default=spec.default,
        min=spec.min,
        max=spec.max,
        step=spec.step,
        round=False,
        tooltip=spec.help,
        optional=optional,
    )
