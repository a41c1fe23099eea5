"""The host's errors: importable before ComfyUI is, so a caller can catch them around its loading."""

from __future__ import annotations


class HostError(RuntimeError):
    """ComfyUI or a checkpoint cannot be used; the message says what to change."""


class OptionError(ValueError):
    """An option the model or file at hand cannot take. ``option`` is its name as the option
    registries spell it (``zero_terminal_snr``, ``lora``), which each caller shows as its own input:
    a node input of that name, a CLI flag ``--zero-terminal-snr``."""

    def __init__(self, option: str, reason: str) -> None:
        super().__init__(f"{option}: {reason}")
        self.option, self.reason = option, reason
