"""Files a training run writes: LoRA safetensors with Diff2Flow metadata and the training state.

:class:`RunFiles` owns every file name of a run (the node and the CLI both use it)::

    <name>.safetensors           the final LoRA (ComfyUI-native keys + Diff2Flow metadata)
    <name>_<step>.safetensors    periodic saves (``save_every``) and the save made on interrupt
    <name>_raw.safetensors       with EMA on and ``save_raw``: the raw weights next to the final LoRA
    <name>_<step>_raw.safetensors   ... and next to each periodic save (the same periodic save)
    <name>.d2fstate              the training state for an exact resume; it belongs to the
                                 periodic save of its step, which ``keep_last`` never deletes
    <name>.toml                  the run's options (``train --config`` reads it back; CLI)
    metrics.jsonl, loss.png      per-step metrics and the loss curve (CLI)
    samples/step_<step>.png      the preview grid of a step (``preview_every``; CLI)

Every write is atomic: the data goes to a temporary file in the same folder, is flushed to disk,
then renamed over the final name. An interrupted or failed write (a full disk included) never
leaves a corrupt file under the final name, and the previous file stays as it was. The temporary
file a killed process could not remove (``.<file name>.<pid>.tmp``) is removed by the next run of
the same name (:meth:`RunFiles.remove_stale_temporaries`).

With EMA on (``ema_decay`` > 0) every LoRA of a run holds the EMA weights
(:meth:`training.engine.Trainer.saved_adapters`); :func:`save_run_lora` and
:func:`write_periodic_save` are the one place the node and the CLI write a run's LoRA files, and
:func:`prune_periodic_saves` the one place ``keep_last`` deletes old ones.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import pathlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from d2f_core.lora_metadata import PREFIX, LoraMetadata

if TYPE_CHECKING:
    from .engine import Trainer

__all__ = [
    "STATE_SUFFIX",
    "RunFiles",
    "OutputExists",
    "atomic_write",
    "ensure_writable_folder",
    "save_lora",
    "save_training_state",
    "load_training_state",
    "sanitize_filename",
    "file_sha256",
    "save_run_lora",
    "write_periodic_save",
    "prune_periodic_saves",
    "remove_stale_temporaries",
]
log = logging.getLogger("diff2flow")

# not a model extension, so LoRA loaders never list training states
STATE_SUFFIX = ".d2fstate"


_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.tmp")  # atomic_write's temporary file of <name>


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> pathlib.Path:
    """Call ``write(tmp_path)`` and rename the result to ``path`` (same folder, so the rename is atomic)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise OSError(exc.errno, f"disk full while writing {path}; the previous file (if any) was kept") from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike, owns: Callable[[str], bool]) -> list[pathlib.Path]:
    """Delete the temporary files of :func:`atomic_write` in ``folder`` whose final file name ``owns``
    accepts and whose writing process is gone (a killed run's). A live process's are kept: another
    run may be writing into the same folder. Returns the deleted files."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        match = _TEMPORARY.fullmatch(path.name)
        if match and owns(match["name"]) and path.is_file() and not _process_alive(int(match["pid"])):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def file_sha256(path: str | os.PathLike, length: int = 16) -> str:
    """The first ``length`` hex digits of a file's SHA-256 (its identity wherever it is moved)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


def ensure_writable_folder(folder: str | os.PathLike) -> pathlib.Path:
    """Create ``folder`` and prove it is writable now (``OSError`` otherwise), before minutes of
    work are spent on something that could not be saved."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".write-test-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()
    return folder


def save_lora(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    metadata: LoraMetadata | None = None,
    extra_metadata: dict[str, str] | None = None,
) -> pathlib.Path:
    """Write LoRA tensors (ComfyUI-native keys) as safetensors with Diff2Flow metadata."""
    header = dict(extra_metadata or {})
    if metadata is not None:
        header.update(metadata.to_header())
    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(data, tmp, metadata=header))


def save_training_state(path: str | os.PathLike, state: dict[str, Any]) -> pathlib.Path:
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_training_state(path: str | os.PathLike) -> dict[str, Any]:
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"training state {path} does not exist: point resume at a .d2fstate file written by a periodic save"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


_UNSAFE = re.compile(r"[^A-Za-z0-9._ -]+")


def sanitize_filename(name: str, suffix: str = ".safetensors") -> str:
    """A plain file name from user text: no folders, no '..', no control or odd characters."""
    stem = pathlib.PurePath(str(name).replace("\\", "/")).name
    if suffix and stem.endswith(suffix):
        stem = stem[: -len(suffix)]
    stem = _UNSAFE.sub("_", stem).strip(" .")
    stem = stem.replace(" ", "_")
    return (stem or "diff2flow_lora") + suffix


class OutputExists(FileExistsError):
    pass


@dataclass(frozen=True)
class RunFiles:
    """The files of the run named ``name`` in ``folder`` (see the module docstring)."""

    folder: pathlib.Path
    name: str

    @classmethod
    def named(cls, folder: str | os.PathLike, name: str) -> RunFiles:
        """The run files for a user-given run name (sanitised: no folders, no odd characters)."""
        return cls(pathlib.Path(folder), sanitize_filename(name)[: -len(".safetensors")])

    @property
    def lora(self) -> pathlib.Path:
        return self.folder / f"{self.name}.safetensors"

    def lora_at(self, step: int) -> pathlib.Path:
        return self.folder / f"{self.name}_{step:06d}.safetensors"

    @property
    def raw_lora(self) -> pathlib.Path:
        return self.folder / f"{self.name}_raw.safetensors"

    def raw_lora_at(self, step: int) -> pathlib.Path:
        return self.folder / f"{self.name}_{step:06d}_raw.safetensors"

    def _periodic_name(self) -> re.Pattern:
        """The names of this run's periodic saves and their ``_raw`` files (group 1: the step)."""
        return re.compile(re.escape(self.name) + r"_(\d{6,})(_raw)?\.safetensors")

    def periodic_saves(self) -> dict[int, list[pathlib.Path]]:
        """The files of this run's periodic saves in its folder, by step: exactly the names
        :meth:`lora_at` and :meth:`raw_lora_at` give (other runs' and unrelated files never match)."""
        pattern = self._periodic_name()
        saves: dict[int, list[pathlib.Path]] = {}
        if not self.folder.is_dir():
            return saves
        for path in sorted(self.folder.iterdir()):
            match = pattern.fullmatch(path.name)
            if match is None or not path.is_file():
                continue
            step = int(match.group(1))
            if path.name in (self.lora_at(step).name, self.raw_lora_at(step).name):  # no stray leading zeros
                saves.setdefault(step, []).append(path)
        return saves

    def state_step(self) -> int | None:
        """The step of this run's training state on disk (``None`` when there is none)."""
        if not self.state.is_file():
            return None
        # mmap: only the small pickle is read, not the adapter and optimizer tensors
        return int(torch.load(self.state, map_location="cpu", weights_only=True, mmap=True)["step"])

    @property
    def state(self) -> pathlib.Path:
        return self.folder / f"{self.name}{STATE_SUFFIX}"

    @property
    def config(self) -> pathlib.Path:
        return self.folder / f"{self.name}.toml"

    @property
    def metrics(self) -> pathlib.Path:
        return self.folder / "metrics.jsonl"

    @property
    def loss_png(self) -> pathlib.Path:
        return self.folder / "loss.png"

    @property
    def samples(self) -> pathlib.Path:
        """The folder of the run's preview grids."""
        return self.folder / "samples"

    def sample_at(self, step: int) -> pathlib.Path:
        """The preview grid of ``step`` (``preview_every``)."""
        return self.samples / f"step_{step:06d}.png"

    def owns(self, file_name: str) -> bool:
        """Whether ``file_name`` (in :attr:`folder`) is one of this run's files."""
        fixed = (self.lora, self.raw_lora, self.state, self.config, self.metrics, self.loss_png)
        if file_name in {p.name for p in fixed}:
            return True
        return self._periodic_name().fullmatch(file_name) is not None

    def remove_stale_temporaries(self) -> list[pathlib.Path]:
        """Delete the temporary files a killed run of this name left (:func:`remove_stale_temporaries`),
        its preview grids' included."""
        return remove_stale_temporaries(self.folder, self.owns) + remove_stale_temporaries(
            self.samples, lambda name: re.fullmatch(r"step_\d{6,}\.png", name) is not None
        )

    def check_new_run(self, resuming: bool, overwrite: bool) -> None:
        """Refuse to overwrite another run's files (unless resuming it, or asked to)."""
        if resuming or overwrite:
            return
        existing = [p.name for p in (self.lora, self.state) if p.exists()]
        if existing:
            raise OutputExists(
                f"{self.folder} already holds a run named {self.name!r} ({', '.join(existing)}): continue it with "
                f"--resume {self.state}, choose another --name or --output, or pass --overwrite"
            )

    def check_writable(self) -> None:
        try:
            ensure_writable_folder(self.folder)
        except OSError as exc:
            raise OSError(
                exc.errno, f"output folder {self.folder} is not writable ({exc.strerror}): choose another --output"
            ) from exc


# ---------------------------------------------------------------------- a run's saves (node and CLI)
def save_run_lora(
    files: RunFiles, trainer: Trainer, metadata: LoraMetadata, step: int | None = None, raw: bool = False
) -> pathlib.Path | None:
    """Write one LoRA file of a save: the saved weights (the EMA's when EMA is on) or, with ``raw``,
    the raw weights (only when ``trainer.saves_raw``: ``None`` otherwise), under the periodic name
    of ``step`` or, with ``step`` None, the final name."""
    if raw and not trainer.saves_raw:
        return None
    if step is None:
        path = files.raw_lora if raw else files.lora
    else:
        path = files.raw_lora_at(step) if raw else files.lora_at(step)
    header = None
    if trainer.ema is not None:  # only with EMA: a file without these keys holds the trained weights
        header = {PREFIX + "weights": "raw" if raw else "ema", PREFIX + "ema_decay": str(trainer.config.ema_decay)}
    return save_lora(path, trainer.lora_state_dict(raw=raw), metadata, header)


def write_periodic_save(files: RunFiles, trainer: Trainer, metadata: LoraMetadata) -> list[pathlib.Path]:
    """A periodic save at ``trainer.step`` (also the save made on interrupt): the LoRA, the raw LoRA
    when asked, the training state, then :func:`prune_periodic_saves` with ``keep_last``."""
    written = [
        save_run_lora(files, trainer, metadata, trainer.step),
        save_run_lora(files, trainer, metadata, trainer.step, raw=True),
        save_training_state(files.state, trainer.state_dict()),
    ]
    prune_periodic_saves(files, trainer.config.keep_last, trainer.step)
    return [p for p in written if p is not None]


def prune_periodic_saves(files: RunFiles, keep_last: int, step: int) -> list[pathlib.Path]:
    """Delete this run's periodic saves older than its last ``keep_last`` ones (0: keep all).

    The saves considered are those at steps up to ``step`` (the save just written): a later-step
    save left by an earlier run of the same name is not "older" and stays. The save the run's
    training state belongs to (its step, read from the file) is never deleted, nor is anything
    whose name is not a periodic save of this run (:meth:`RunFiles.periodic_saves`). Returns the
    deleted files.
    """
    if keep_last <= 0:
        return []
    saves = files.periodic_saves()
    older = sorted(s for s in saves if s <= step)[:-keep_last]
    if not older:
        return []
    try:
        protected = files.state_step()
    except Exception as exc:
        log.warning("keep_last: could not read the step of %s (%s); no periodic save was deleted", files.state, exc)
        return []
    deleted = []
    for s in older:
        if s == protected:
            continue
        for path in saves[s]:
            path.unlink(missing_ok=True)
            deleted.append(path)
    return deleted
