"""A headless training run around :class:`Trainer`: its output files, progress and interrupts.

One run writes the files of :class:`training.files.RunFiles` into its output folder (rank 0 only):
the LoRA (the EMA weights when EMA is on; the raw ones too with ``save_raw``), periodic saves (the
last ``keep_last``), the training state, ``metrics.jsonl`` (one JSON line per step: step,
loss, lr, seconds, it/s) and ``loss.png``. With previews (``preview_every``, a
:class:`training.previews.Previewer`) it writes each grid to ``samples/step_<step>.png`` and lists it
in ``metrics.jsonl`` as its own line ``{"step", "sample": "samples/step_<step>.png",
"sample_seconds"}``; the it/s of the next step does not count the preview's time. With a validation
loss (``validation_every``) each evaluation is its own line ``{"step", "validation_loss"}`` (step 0:
before training), drawn in ``loss.png`` too.

Ctrl-C or SIGTERM: the current step finishes, every process stops at the same step, the state and
the LoRA are written atomically, and the run exits with 130 / 143 and the command that resumes
it. A second Ctrl-C abandons the step in flight (the state of the last finished step is saved).
"""

from __future__ import annotations

import contextlib
import json
import math
import pathlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from d2f_core.lora_metadata import LoraMetadata
from training.engine import Trainer, TrainingError
from training.files import (
    RunFiles,
    atomic_write,
    prune_periodic_saves,
    save_run_lora,
    save_training_state,
    write_periodic_save,
)
from training.plots import save_loss_curve
from training.previews import save_grid_png

from . import distributed
from .distributed import World

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class StopRequested(Exception):
    """Raised between steps when any process received Ctrl-C / SIGTERM."""


class StopSignals:
    """Turns SIGINT / SIGTERM into a request to stop after the current step (a second SIGINT
    abandons the step: KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        print(
            f"\n{signal.Signals(signum).name}: stopping after this step and saving (Ctrl-C again to abandon the step)",
            file=sys.stderr,
            flush=True,
        )

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignals]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals reach the main thread only; the caller stops the run otherwise
            return
        for sig in EXIT_CODES:
            self._previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)


class MetricsLog:
    """metrics.jsonl: one line per step; a resumed run keeps the lines up to its resume step."""

    def __init__(self, path: pathlib.Path, resume_step: int) -> None:
        self.path = path
        kept = []
        if resume_step > 0 and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line)
                except (ValueError, KeyError):
                    continue
        text = "".join(line + "\n" for line in kept)
        atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text(text, encoding="utf-8"))
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def run_headless(
    trainer: Trainer,
    files: RunFiles,
    metadata: Callable[[int], LoraMetadata],
    world: World = distributed.ONE_PROCESS,
    resume_hint: str = "",
    progress: bool = True,
    previewer: Callable[[Trainer], Any] | None = None,
) -> int:
    """Train to ``trainer.config.steps`` writing ``files``; returns the process exit code
    (0 done, 130 / 143 interrupted and saved, 1 failed)."""
    main = world.is_main
    config = trainer.config
    metrics = MetricsLog(files.metrics, trainer.step) if main else None
    bar = None
    if main and progress:
        from tqdm import tqdm

        bar = tqdm(total=config.steps, initial=trainer.step, unit="step", dynamic_ncols=True, desc=files.name)
    stops = StopSignals()
    started = time.perf_counter()
    last = [started]
    step_start_generator = [trainer.generator.get_state()]

    def write_files(final: bool) -> list[pathlib.Path]:
        if not main:
            return []
        if final:
            loras = [save_run_lora(files, trainer, metadata(trainer.step), raw=raw) for raw in (False, True)]
            written = [p for p in loras if p is not None] + [save_training_state(files.state, trainer.state_dict())]
            # the last periodic save's pruning, which a run killed right after writing its state never did
            prune_periodic_saves(files, config.keep_last, trainer.step)
        else:  # periodic and interrupt saves, pruned to keep_last
            written = write_periodic_save(files, trainer, metadata(trainer.step))
        save_loss_curve(
            files.loss_png,
            {config.objective: trainer.losses},
            title=f"{files.name}: {config.objective} loss",
            points={"validation": trainer.validation_losses},
        )
        return written

    def on_step(step: int, loss: float, lr: float) -> None:
        # the step is done: an interrupt from here on (a save, preview, validation or the next step) returns the
        # generator to here (nothing else draws from it before the next step)
        step_start_generator[0] = trainer.generator.get_state()
        now = time.perf_counter()
        if metrics is not None:
            metrics.write(
                {
                    "step": step,
                    "loss": loss,
                    "lr": lr,
                    "seconds": round(now - started, 4),
                    "it_s": round(1.0 / max(now - last[0], 1e-9), 4),
                }
            )
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4g}", lr=f"{lr:.3g}", refresh=False)
            bar.update(1)
        last[0] = now

    def preview(t: Trainer) -> None:
        if not main or previewer is None:  # one process samples; the others go on to the next step's all-reduce
            return
        made = previewer(t)
        path = files.sample_at(t.step)
        save_grid_png(path, made.grid, f"step {t.step}: {previewer.settings.describe()}")
        if metrics is not None:
            metrics.write(
                {
                    "step": t.step,
                    "sample": path.relative_to(files.folder).as_posix(),
                    "sample_seconds": round(made.seconds, 4),
                }
            )
        last[0] = time.perf_counter()  # the next step's it/s is the step's own

    def on_validation(step: int, loss: float) -> None:
        if metrics is not None:  # JSON has no NaN: a non-finite loss is written as null
            metrics.write({"step": step, "validation_loss": loss if math.isfinite(loss) else None})
        if bar is not None:
            bar.write(f"step {step}: validation loss {loss:.5g}")
        last[0] = time.perf_counter()  # the next step's it/s is the step's own

    def check_stop() -> None:
        if distributed.any_process(stops.received is not None, world):
            raise StopRequested

    code, message = 0, ""
    try:
        with stops.installed():
            try:
                trainer.run(
                    on_step=on_step,
                    check_cancel=check_stop,
                    save=lambda t: write_files(final=False),
                    preview=preview if previewer is not None else None,
                    on_validation=on_validation,
                )
            except KeyboardInterrupt:
                # the step in flight is abandoned: the trainer is as it was before it, except the generator
                trainer.generator.set_state(step_start_generator[0])
                raise StopRequested from None
            written = write_files(final=True)
            if main:
                message = f"trained {trainer.step} steps: " + ", ".join(str(p) for p in written)
    except StopRequested:
        code = EXIT_CODES.get(stops.received or signal.SIGINT, 130)
        written = write_files(final=False)
        if main:
            message = (
                f"interrupted at step {trainer.step} of {config.steps}; saved "
                + ", ".join(str(p) for p in written)
                + (f"\nresume with: {resume_hint}" if resume_hint else "")
            )
    except TrainingError as exc:
        code, message = 1, f"training failed: {exc}"
    finally:
        if bar is not None:
            bar.close()
        if metrics is not None:
            metrics.close()
    if message:
        print(message, file=sys.stderr if code else sys.stdout, flush=True)
    return code
