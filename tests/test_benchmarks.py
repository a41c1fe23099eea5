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

# script -> (needs ComfyUI, the line(s) its report must print)
SCRIPTS = {
    # the quick run also evaluates a checkpoint, so the training-budget curve's section is printed too
    "depth.py": (False, ("AbsRel (lower is better) by sampler steps", "## By training steps")),
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
    for line in (expected,) if isinstance(expected, str) else expected:
        assert line in result.stdout + result.stderr, result.stdout[-2000:]


def _depth_run(method: str, adapter: str, curve: dict[int, float]) -> dict:
    """A depth benchmark run whose every metric at checkpoint ``k`` is ``curve[k]`` (AbsRel, any sampler steps)."""
    def metrics(value: float) -> dict:
        cell = {"abs_rel": value, "delta1": 1 - value}
        return {"single": {str(s): cell for s in (1, 2, 10)}, "ensemble": {str(s): cell for s in (1, 2, 10)}}
    return {"method": method, "adapter": adapter, "seed": 0, "curve": {str(k): metrics(v) for k, v in curve.items()},
            "metrics": metrics(curve[max(curve)])}


def test_depth_report_reads_targets_and_instability_at_each_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """The training-budget curve: targets are judged on the checkpoint asked for (not the last step), and a
    run that ends worse than its first checkpoint is named as unstable."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import depth

    report = {"config": {"adapters": ["full"], "sampler_steps": [1, 2, 10]}, "runs": [
        _depth_run("diff2flow", "full", {100: 0.20, 200: 0.10}),
        _depth_run("naive_fm", "full", {100: 0.15, 200: 0.30}),  # better early, then diverges
        _depth_run("diffusion", "full", {100: 0.40, 200: 0.20}),
        _depth_run("regression", "full", {100: 0.10, 200: 0.10}),
    ]}
    naive_target = "Diff2Flow AbsRel <= naive FM at every step budget"
    assert depth.checkpoints(report) == [100, 200]
    for at, met in ((100, False), (200, True), (None, True)):
        found = [t for t in depth.targets(report, at) if t["target"] == naive_target and t["mode"] == "single"]
        assert [t["met"] for t in found] == [met], at
    assert depth.unstable_runs(report) == ["naive_fm full seed 0"]
