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


# ---------------------------------------------------------------------- keep_last
def make_folder(tmp_path, state_step=8):
    """A folder with the run "run" (saves at 2..8, raw saves at 4 and 8, a later save at 10 left by
    an earlier run of that name), its other files, other runs' saves and unrelated files."""
    run = files.RunFiles(tmp_path, "run")
    ours = [run.lora_at(s) for s in (2, 4, 6, 8, 10)] + [run.raw_lora_at(4), run.raw_lora_at(8)]
    others = [
        run.lora,
        run.raw_lora,
        run.config,
        tmp_path / "run_2_000002.safetensors",
        tmp_path / "other_000004.safetensors",
        tmp_path / "run_00002.safetensors",
        tmp_path / "run_0000004.safetensors",
        tmp_path / "run_000004.ckpt",
        tmp_path / "run_000004.safetensors.bak",
        tmp_path / "xrun_000004.safetensors",
        tmp_path / "run_000004_ema.safetensors",
        tmp_path / "notes.txt",
    ]
    for p in ours + others:
        p.write_bytes(b"x")
    (tmp_path / "run_000001.safetensors").mkdir()  # a folder of that name is no save
    if state_step is not None:
        files.save_training_state(run.state, {"step": state_step, "adapters": {"a": torch.zeros(3)}})
    return run


def names(folder) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_keep_last_deletes_exactly_the_older_periodic_saves(tmp_path) -> None:
    run = make_folder(tmp_path)
    before = names(tmp_path)
    deleted = files.prune_periodic_saves(run, 2, step=8)
    gone = {"run_000002.safetensors", "run_000004.safetensors", "run_000004_raw.safetensors"}
    assert {p.name for p in deleted} == gone
    assert names(tmp_path) == before - gone  # 6, 8, 8_raw, the later 10, and every file of others stay
    assert files.prune_periodic_saves(run, 2, step=8) == []  # nothing more to do


def test_keep_last_never_deletes_the_save_of_the_training_state(tmp_path) -> None:
    run = make_folder(tmp_path, state_step=4)
    deleted = files.prune_periodic_saves(run, 1, step=8)
    assert {p.name for p in deleted} == {"run_000002.safetensors", "run_000006.safetensors"}
    assert {"run_000004.safetensors", "run_000004_raw.safetensors", "run_000008.safetensors"} <= names(tmp_path)


def test_keep_last_zero_keeps_all(tmp_path) -> None:
    run = make_folder(tmp_path)
    before = names(tmp_path)
    assert files.prune_periodic_saves(run, 0, step=8) == [] and names(tmp_path) == before


def test_unreadable_state_deletes_nothing(tmp_path) -> None:
    run = make_folder(tmp_path, state_step=None)
    run.state.write_bytes(b"not a torch file")
    before = names(tmp_path)
    assert files.prune_periodic_saves(run, 1, step=8) == [] and names(tmp_path) == before


def dead_pid() -> int:
    """The PID of a process that has exited (a killed run's)."""
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_temporaries_of_the_run_are_removed_and_others_kept(tmp_path) -> None:
    run = files.RunFiles(tmp_path, "tiny")
    gone = dead_pid()
    stale = [
        f".tiny.d2fstate.{gone}.tmp",
        f".tiny_000004.safetensors.{gone}.tmp",
        f".tiny_000004_raw.safetensors.{gone}.tmp",
        f".loss.png.{gone}.tmp",
        f".metrics.jsonl.{gone}.tmp",
        f".tiny.safetensors.{gone}.tmp",
        f".tiny.toml.{gone}.tmp",
    ]
    kept = [
        ".tiny.d2fstate.1.tmp",  # a live process (init) may be writing it
        f".other.d2fstate.{gone}.tmp",
        f".tiny_2.safetensors.{gone}.tmp",  # another run's
        "tiny.safetensors",
        f".notes.txt.{gone}.tmp",
    ]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / f".step_000002.png.{gone}.tmp").write_bytes(b"x")
    removed = run.remove_stale_temporaries()
    assert sorted(p.name for p in removed) == sorted(stale + [f".step_000002.png.{gone}.tmp"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["samples"])
    assert not any((tmp_path / "samples").iterdir())
