"""Every benchmark script runs in its --quick mode, as the README states it, from outside the
repository's folder (the scripts put the repository on sys.path themselves, so a fresh clone runs
them without installing). The figures of a quick run mean nothing; what is checked is that the
script runs to its report."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
from comfy_harness import COMFYUI, COMFYUI_IMPORT_ERROR, ROOT, SKIP_REASON

BENCHMARKS = ROOT / "benchmarks"

# script -> (needs ComfyUI, the line(s) its report must print)
SCRIPTS = {
    # the quick run also evaluates a checkpoint, so the training-budget curve's section is printed too
    "depth.py": (
        False,
        (
            "AbsRel (lower is better) by sampler steps",
            "## Test denoising error by noise level",
            "The samples' MSE against the normalised test depth",
            "## By training steps",
        ),
    ),
    "ema.py": (False, "on - off (per seed)"),
    "exactness.py": (False, "max rel. error"),
    "gpu_suite.py": (True, "| part | what | result |"),
    "optimizers.py": (False, "| optimizer | learning rate |"),
    "paper_comparison.py": (False, "FD by sampler steps"),
    "pair_accuracy.py": (False, "## Target: 32-step Euler's accuracy"),
    "reflow.py": (False, "FD by sampler steps (FM Euler, cfg 1)"),
    "start_rule.py": (False, "beats 'sigma_max'"),  # its table is checked in d2f_core/tests/test_top_of_schedule.py
    "memory.py": (True, "## What fits a GPU of 8 / 12 / 16 / 24 GB"),
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
    args = [sys.executable, str(BENCHMARKS / script), "--quick"] + (
        ["--device", "cpu"] if script == "gpu_suite.py" else []
    )
    if script in ("depth.py", "optimizers.py", "pair_accuracy.py", "paper_comparison.py", "reflow.py"):
        args += ["--out", str(tmp_path / "results"), "--jobs", "1"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TMPDIR"] = str(tmp_path)  # quick runs without --out (ema.py) write to a temporary folder: keep it in here
    if COMFYUI is not None:
        env["COMFYUI_PATH"] = str(COMFYUI)
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    for line in (expected,) if isinstance(expected, str) else expected:
        assert line in result.stdout + result.stderr, result.stdout[-2000:]


def _listing(folder: pathlib.Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder``: relative path -> (mtime in ns, size)."""
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*") if p.is_file()
    }


@pytest.mark.slow
def test_quick_mode_without_out_writes_to_a_temporary_folder_not_the_checkout(tmp_path: pathlib.Path) -> None:
    """A --quick run checks the script: without --out its report goes to a fresh temporary folder, printed,
    and nothing in the checkout's benchmarks/results/ is added or rewritten (the depth benchmark: the quickest
    that writes a report; the folder rule is the one every toy benchmark shares, paper_comparison.report_folder)."""
    results = BENCHMARKS / "results"
    before = _listing(results)
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TMPDIR"] = str(temp)
    try:
        result = subprocess.run(
            [sys.executable, str(BENCHMARKS / "depth.py"), "--quick", "--jobs", "1"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
    finally:
        after = _listing(results)
        for name in set(after) - set(before):  # this test never leaves the checkout dirty, even when it fails
            (results / name).unlink(missing_ok=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert after == before, f"a quick run wrote into {results}: {sorted(k for k in after if after[k] != before.get(k))}"
    found = re.search(r"^quick run: writing the report to (\S+)", result.stdout, re.MULTILINE)
    assert found, result.stdout[-2000:]
    folder = pathlib.Path(found.group(1))
    assert folder.parent == temp and folder.name.startswith("d2f_depth_quick_")
    assert {"depth_quick.md", "depth_quick.json", "depth_quick_abs_rel_vs_steps.png"} <= {
        p.name for p in folder.iterdir()
    }
    assert "AbsRel (lower is better) by sampler steps" in (folder / "depth_quick.md").read_text()


def test_report_folder_is_results_for_full_runs_and_a_fresh_temporary_one_for_quick_runs(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import tempfile

    import paper_comparison

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert paper_comparison.report_folder(None, False, "depth") == BENCHMARKS / "results"
    assert paper_comparison.report_folder(tmp_path / "mine", True, "depth") == tmp_path / "mine"  # --out wins
    first, second = (paper_comparison.report_folder(None, True, "reflow") for _ in range(2))
    assert first != second and {first.parent, second.parent} == {tmp_path}
    assert first.is_dir() and first.name.startswith("d2f_reflow_quick_") and not any(first.iterdir())
    assert f"writing the report to {first}" in capsys.readouterr().out  # printed, so the user can find it


@pytest.mark.parametrize("adapters", ["lora0", "lora", "loraX", "dense", "lora16,lora16", ""])
def test_reflow_refuses_students_it_cannot_build(
    adapters: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """--adapters takes lora<rank> (any rank > 0) or full, each once; anything else stops before any work."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import reflow

    with pytest.raises(SystemExit) as stopped:
        reflow.main(["--quick", "--adapters", adapters])
    assert stopped.value.code == 2
    assert "--adapters must name lora<rank> (rank > 0) or full, each once" in capsys.readouterr().err


def test_reflow_trains_the_seeds_from_first_seed_with_the_grid_share(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """--first-seed K --seeds N trains and evaluates seeds K .. K + N - 1 (the teacher's too); --grid-share is
    the students' TrainConfig grid_share; bad values stop before any work."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import reflow

    configs = []
    real_trainer = reflow.Trainer
    monkeypatch.setattr(reflow, "Trainer", lambda *a, **k: configs.append(a[3]) or real_trainer(*a, **k))
    out = tmp_path / "out"
    quick = ["--quick", "--jobs", "1", "--adapters", "lora4", "--out", str(out)]
    assert reflow.main([*quick, "--first-seed", "2", "--seeds", "2", "--grid-share", "0.25"]) == 0
    report = json.loads((out / "reflow_quick.json").read_text())
    assert report["config"]["seeds"] == [2, 3]
    assert [t["seed"] for t in report["teacher"]] == [2, 3] and [s["seed"] for s in report["students"]] == [2, 3]
    assert [(c.seed, c.grid_share) for c in configs] == [(2, 0.25), (3, 0.25)]
    configs.clear()
    assert reflow.main([*quick, "--grid-share", "-1"]) == 0  # reflow's recommended share, reported as the share it is
    report = json.loads((out / "reflow_quick.json").read_text())
    assert report["config"]["options"]["grid_share"] == 0.5 and [c.resolved_grid_share for c in configs] == [0.5]
    for bad, message in (("--first-seed=-1", "--first-seed must be >= 0"), ("--grid-share=2", "grid_share must lie")):
        with pytest.raises(SystemExit) as stopped:
            reflow.main(["--quick", bad])
        assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_reflow_trains_the_students_with_the_chosen_optimizer(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """--optimizer is the students' TrainConfig optimizer and the report names it; an optimizer whose package is
    missing stops before any work, naming the install command."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import dataclasses

    import reflow

    if reflow.OPTIMIZERS["Lion"].missing() is not None:
        pytest.skip(reflow.OPTIMIZERS["Lion"].missing())
    configs = []
    real_trainer = reflow.Trainer
    monkeypatch.setattr(reflow, "Trainer", lambda *a, **k: configs.append(a[3]) or real_trainer(*a, **k))
    out = tmp_path / "out"
    assert reflow.main(["--quick", "--jobs", "1", "--adapters", "lora4", "--optimizer", "Lion", "--out", str(out)]) == 0
    assert [c.optimizer for c in configs] == ["Lion"]
    assert "Lion without weight decay" in (out / "reflow_quick.md").read_text()
    absent = dataclasses.replace(reflow.OPTIMIZERS["Lion"], module="d2f_no_such_module", package="lion-pytorch")
    monkeypatch.setitem(reflow.OPTIMIZERS, "Lion", absent)
    configs.clear()
    with pytest.raises(SystemExit) as stopped:
        reflow.main(["--quick", "--optimizer", "Lion", "--out", str(out)])
    assert stopped.value.code == 2 and "pip install 'lion-pytorch'" in capsys.readouterr().err and configs == []


def test_reflow_report_judges_the_second_generations_targets_on_the_seed_means(monkeypatch: pytest.MonkeyPatch) -> None:
    """The report judges issue 24's targets (1-step FD <= the teacher's 8-step, 2-step FD <= its 50-step) on the
    means over seeds, per student, next to the first generation's."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import reflow

    def fd(one: float, two: float, eight: float = 4.0, fifty: float = 3.0) -> dict[str, float]:
        return {"1": one, "2": two, "4": two, "8": eight, "50": fifty}

    report = {
        "config": {"adapters": ["lora16", "lora256"]},
        # teacher means: 8 steps 4.0, 50 steps 3.0
        "teacher": [{"fd": fd(75.0, 18.0, 3.5, 2.5)}, {"fd": fd(75.0, 18.0, 4.5, 3.5)}],
        "students": [
            # lora16: 2-step mean 3.05 > 3.0 (one seed below it), 1-step mean 4.1 > 4.0
            {"adapter": "lora16", "fd": fd(3.9, 2.9)},
            {"adapter": "lora16", "fd": fd(4.3, 3.2)},
            # lora256: 2-step mean 2.95 <= 3.0 (one seed above it), 1-step mean 3.0
            {"adapter": "lora256", "fd": fd(2.5, 2.6)},
            {"adapter": "lora256", "fd": fd(3.5, 3.3)},
        ],
    }
    met = {(t["adapter"], t["target"]): (t["student"], t["bound"], t["met"]) for t in reflow.targets(report)}
    assert met[("lora16", "1-step FD <= teacher 8-step FD")] == pytest.approx((4.1, 4.0, False))
    assert met[("lora16", "2-step FD <= teacher 50-step FD")] == pytest.approx((3.05, 3.0, False))
    assert met[("lora256", "1-step FD <= teacher 8-step FD")] == pytest.approx((3.0, 4.0, True))
    assert met[("lora256", "2-step FD <= teacher 50-step FD")] == pytest.approx((2.95, 3.0, True))


def _depth_run(method: str, adapter: str, curve: dict[int, float]) -> dict:
    """A depth benchmark run whose every metric at checkpoint ``k`` is ``curve[k]`` (AbsRel, any sampler steps)."""

    def metrics(value: float) -> dict:
        cell = {"abs_rel": value, "delta1": 1 - value}
        return {"single": {str(s): cell for s in (1, 2, 10)}, "ensemble": {str(s): cell for s in (1, 2, 10)}}

    return {
        "method": method,
        "adapter": adapter,
        "seed": 0,
        "curve": {str(k): metrics(v) for k, v in curve.items()},
        "metrics": metrics(curve[max(curve)]),
    }


def test_depth_report_reads_targets_and_instability_at_each_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """The training-budget curve: targets are judged on the checkpoint asked for (not the last step), and a
    run that ends worse than its first checkpoint is named as unstable."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import depth

    report = {
        "config": {"adapters": ["full"], "sampler_steps": [1, 2, 10]},
        "runs": [
            _depth_run("diff2flow", "full", {100: 0.20, 200: 0.10}),
            _depth_run("naive_fm", "full", {100: 0.15, 200: 0.30}),  # better early, then diverges
            _depth_run("diffusion", "full", {100: 0.40, 200: 0.20}),
            _depth_run("regression", "full", {100: 0.10, 200: 0.10}),
        ],
    }
    naive_target = "Diff2Flow AbsRel <= naive FM at every step budget"
    assert depth.checkpoints(report) == [100, 200]
    for at, met in ((100, False), (200, True), (None, True)):
        found = [t for t in depth.targets(report, at) if t["target"] == naive_target and t["mode"] == "single"]
        assert [t["met"] for t in found] == [met], at
    assert depth.unstable_runs(report) == ["naive_fm full seed 0"]


def test_depth_denoising_error_is_the_data_estimate_mse_at_each_sigma(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a point-mass data set (every target the constant c) the exact velocity is (x - c) / sigma, so its data
    estimate has no error at any sigma; a velocity off by delta everywhere has error (sigma * delta)**2; a zero
    velocity leaves x itself, whose error on the FM interpolant is sigma**2 (c**2 + 1)."""
    import torch

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import depth

    c, delta, sigmas = 0.3, 0.5, (0.1, 0.5, 0.9)
    x0 = torch.full((64, 1, 16, 16), c)

    def exact(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return (x - c) / sigma.reshape(-1, 1, 1, 1)

    found = depth.denoising_mse(exact, x0, sigmas, torch.Generator().manual_seed(0))
    assert set(found) == {"0.1", "0.5", "0.9"}
    assert max(found.values()) < 1e-10
    off = depth.denoising_mse(lambda x, s: exact(x, s) + delta, x0, sigmas, torch.Generator().manual_seed(0))
    for sigma in sigmas:
        assert off[str(sigma)] == pytest.approx((sigma * delta) ** 2, rel=1e-5)
    still = depth.denoising_mse(lambda x, s: torch.zeros_like(x), x0, sigmas, torch.Generator().manual_seed(0))
    for sigma in sigmas:  # 2 draws of 16384 values: the estimate is within about 1 %
        assert still[str(sigma)] == pytest.approx(sigma**2 * (c**2 + 1), rel=0.03)
    gen = torch.Generator().manual_seed(1)  # draws = 2 is the mean over the next two noise draws
    one = [depth.denoising_mse(lambda x, s: torch.zeros_like(x), x0, (0.5,), gen, draws=1)["0.5"] for _ in range(2)]
    two = depth.denoising_mse(lambda x, s: torch.zeros_like(x), x0, (0.5,), torch.Generator().manual_seed(1), draws=2)
    assert one[0] != one[1] and two["0.5"] == pytest.approx(sum(one) / 2, rel=1e-6)


def test_depth_denoising_lead_names_the_noise_levels_where_diff2flow_is_below_naive_fm(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import depth

    def run(method: str, seed: int, errors: tuple[float, float, float]) -> dict:
        return {
            "method": method,
            "adapter": "full",
            "seed": seed,
            "metrics": {"denoise": {s: e for s, e in zip(("0.1", "0.5", "0.9"), errors)}},
        }

    report = {
        "config": {"adapters": ["full"], "denoise_sigmas": [0.1, 0.5, 0.9]},
        "runs": [
            run("diff2flow", 0, (0.010, 0.20, 0.30)),
            run("diff2flow", 1, (0.012, 0.22, 0.50)),
            run("naive_fm", 0, (0.012, 0.19, 0.35)),
            run("naive_fm", 1, (0.014, 0.21, 0.40)),
        ],
    }
    # means: diff2flow 0.011 / 0.21 / 0.40 against naive FM 0.013 / 0.20 / 0.375
    assert depth.denoising_lead(report, "full") == ["0.1"]


def test_depth_sample_mse_lead_names_the_step_budgets_where_diff2flow_samples_are_closer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import depth

    def run(method: str, mse: tuple[float, float, float]) -> dict:
        single = {str(s): {"abs_rel": 0.1, "mse": m} for s, m in zip((1, 2, 10), mse)}
        return {"method": method, "adapter": "lora16", "seed": 0, "metrics": {"single": single}}

    report = {
        "config": {"adapters": ["lora16"], "sampler_steps": [1, 2, 10]},
        "runs": [
            run("diff2flow", (0.10, 0.15, 0.20)),
            run("naive_fm", (0.11, 0.14, 0.21)),
            run("diffusion", (0.01, 0.01, 0.01)),
        ],
    }
    assert depth.sample_mse_lead(report, "lora16") == [1, 10]
