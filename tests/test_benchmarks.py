"""Every benchmark script runs in its --quick mode, as the README states it, from outside the
repository's folder (the scripts put the repository on sys.path themselves, so a fresh clone runs
them without installing). The figures of a quick run mean nothing; what is checked is that the
script runs to its report."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from comfy_harness import COMFYUI, COMFYUI_IMPORT_ERROR, ROOT, SKIP_REASON

BENCHMARKS = ROOT / "benchmarks"

# script -> (needs ComfyUI, a line its report must print)
SCRIPTS = {
    "depth.py": (False, "AbsRel (lower is better) by sampler steps"),
    "ema.py": (False, "on - off (per seed)"),
    "exactness.py": (False, "max rel. error"),
    "paper_comparison.py": (False, "FD by sampler steps"),
    "reflow.py": (False, "FD by sampler steps (FM Euler, cfg 1)"),
    "start_rule.py": (False, "beats 'sigma_max'"),  # its table is checked in d2f_core/tests/test_top_of_schedule.py
    "patch_overhead.py": (True, "ratio"),
    "train_speed.py": (True, "ours/bare step time"),
    "cli_overhead.py": (True, "CLI / bare step time"),
}


def test_every_benchmark_script_is_listed() -> None:
    assert {p.name for p in BENCHMARKS.glob("*.py")} == set(SCRIPTS)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_benchmark_quick_mode_runs(script: str, tmp_path: pathlib.Path) -> None:
    needs_comfyui, expected = SCRIPTS[script]
    if needs_comfyui and COMFYUI is None:
        pytest.skip(COMFYUI_IMPORT_ERROR or SKIP_REASON)
    args = [sys.executable, str(BENCHMARKS / script), "--quick"]
    if script in ("depth.py", "paper_comparison.py", "reflow.py"):
        args += ["--out", str(tmp_path / "results"), "--jobs", "1"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if COMFYUI is not None:
        env["COMFYUI_PATH"] = str(COMFYUI)
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert expected in result.stdout + result.stderr, result.stdout[-2000:]
