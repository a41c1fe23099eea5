"""Files a training run writes: LoRA safetensors with Diff2Flow metadata and the training state.

:class:`RunFiles` owns every file name of a run (the node and the CLI both use it)::

    <name>.safetensors           the final LoRA (ComfyUI-native keys + Diff2Flow metadata)
    <name>_<step>.safetensors    periodic saves (``save_every``) and the save made on interrupt
    <name>.d2fstate              the training state for an exact resume
    <name>.toml                  the run's options (``train --config`` reads it back; CLI)
    metrics.jsonl, loss.png      per-step metrics and the loss curve (CLI)

Every write is atomic: the data goes to a temporary file in the same folder, is flushed to disk,
then renamed over the final name. An interrupted or failed write (a full disk included) never
leaves a corrupt file under the final name, and the previous file stays as it was.
"""
from __future__ import annotations

import errno
import hashlib
import os
import pathlib
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from d2f_core.lora_metadata import LoraMetadata

__all__ = [
    "STATE_SUFFIX", "RunFiles", "OutputExists", "atomic_write", "ensure_writable_folder", "save_lora",
    "save_training_state", "load_training_state", "sanitize_filename", "file_sha256",
]

# not a model extension, so LoRA loaders never list training states
STATE_SUFFIX = ".d2fstate"


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


def save_lora(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: LoraMetadata | None = None,
              extra_metadata: dict[str, str] | None = None) -> pathlib.Path:
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
        raise FileNotFoundError(f"training state {path} does not exist: point resume at a .d2fstate file written by a periodic save")
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
    def named(cls, folder: str | os.PathLike, name: str) -> "RunFiles":
        """The run files for a user-given run name (sanitised: no folders, no odd characters)."""
        return cls(pathlib.Path(folder), sanitize_filename(name)[: -len(".safetensors")])

    @property
    def lora(self) -> pathlib.Path:
        return self.folder / f"{self.name}.safetensors"

    def lora_at(self, step: int) -> pathlib.Path:
        return self.folder / f"{self.name}_{step:06d}.safetensors"

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
            raise OSError(exc.errno, f"output folder {self.folder} is not writable ({exc.strerror}): choose another --output") from exc
