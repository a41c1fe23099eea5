"""Atomic LoRA / state files and file-name sanitising."""
from __future__ import annotations

import errno

import pytest
import torch
from safetensors import safe_open

import training.files as files
from d2f_core.lora_metadata import LoraMetadata


def test_lora_file_carries_metadata(tmp_path) -> None:
    meta = LoraMetadata("diff2flow", "eps", False, rank=4, alpha=4.0, steps=10)
    path = files.save_lora(tmp_path / "a.safetensors", {"diffusion_model.x.lora_up.weight": torch.ones(2, 2)}, meta)
    with safe_open(str(path), framework="pt") as f:
        assert LoraMetadata.from_header(f.metadata()) == meta
        assert list(f.keys()) == ["diffusion_model.x.lora_up.weight"]
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temporary file left


def test_failed_write_leaves_no_file_and_keeps_previous(tmp_path, monkeypatch) -> None:
    target = tmp_path / "lora.safetensors"
    files.save_lora(target, {"k": torch.zeros(3)})
    previous = target.read_bytes()

    def broken_save(data, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full while writing .*previous file .* was kept"):
        files.save_lora(target, {"k": torch.ones(3)})
    assert target.read_bytes() == previous
    with pytest.raises(OSError):
        files.save_lora(tmp_path / "new.safetensors", {"k": torch.ones(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors"]


def test_interrupt_during_write_leaves_no_file(tmp_path) -> None:
    def interrupted(path):
        with open(path, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(tmp_path / "state.pt", interrupted)
    assert list(tmp_path.iterdir()) == []


def test_missing_state_file_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="point resume at a .d2fstate file"):
        files.load_training_state(tmp_path / "nope.d2fstate")


@pytest.mark.parametrize(
    "name,expected",
    [
        ("my lora", "my_lora.safetensors"),
        ("../../etc/passwd", "passwd.safetensors"),
        ("..", "diff2flow_lora.safetensors"),
        ("a/b\\c.safetensors", "c.safetensors"),
        ("x\x00y:z", "x_y_z.safetensors"),
        ("", "diff2flow_lora.safetensors"),
    ],
)
def test_sanitize_filename(name: str, expected: str) -> None:
    assert files.sanitize_filename(name) == expected
