"""Faults and soak, as figures (slow): SIGKILL at random points of a headless ``train`` and a ``pairs``
run, and 10 trainings in a row in one ComfyUI process.

(a) ``python -m training train`` (save every step, keep_last 2) and ``python -m training pairs`` (one
batch per shard) run once uninterrupted as the reference, then ``KILLS`` times each SIGKILLed at a
random moment (a fixed seed) uniform over the part of the reference's duration after ComfyUI and the
checkpoint loaded (from the moment the run's first file appears: ``NAME.toml`` / ``manifest.json``),
so the kills land mid-step, mid-save, mid-shard and at the end. After each kill no file under a final
name may be corrupt (safetensors, training state, TOML, JSON, PNG; only a partial last line of
metrics.jsonl is tolerated, and the resume must repair it); then the run is finished (``train
--resume`` from the state, or the first command again with ``--overwrite`` when no state was written;
``pairs``: the same command again) and must exit 0 with exactly the uninterrupted run's result and no
temporary file left. Where each kill landed is read from the files on disk. A kill that the run
outlives (it ran faster than the reference) is drawn again. Kill points too narrow to hit at random
are added as targeted cases, their files made by hand: ``train`` after the last step's state was
written but before pruning and the final LoRA (mid-write), ``train`` mid-write of the first save
before any state, ``pairs`` mid-write of manifest.json and of pairs.toml.

(b) The Train Diff2Flow LoRA node, with periodic saves and previews, 10 times in a row in this
process: resident memory must level off (growth from after run 2 to after run 10 under 5 %) and no
temporary file may remain.

Each test prints its figures as Markdown (``pytest -s``) for benchmarks/results/faults.md.
``D2F_FAULT_KILLS`` (default 10) sets the kills per command. Deselect with ``-m "not slow"``.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from comfy_harness import COMFYUI, ROOT, require_comfyui

require_comfyui()

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from training import TrainConfig  # noqa: E402
from training.pairs import load_pairs  # noqa: E402

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

pytestmark = pytest.mark.slow

KILLS = int(os.environ.get("D2F_FAULT_KILLS", "10"))
SEED = 20260601  # the kill moments
PROCESS_TIMEOUT_S = 300.0
NAME = "faults"
TRAIN_STEPS, KEEP_LAST = 12, 2
TRAIN_OPTIONS = [
    "--steps",
    str(TRAIN_STEPS),
    "--batch-size",
    "2",
    "--rank",
    "4",
    "--learning-rate",
    "1e-3",
    "--seed",
    "3",
    "--save-every",
    "1",
    "--keep-last",
    str(KEEP_LAST),
    "--name",
    NAME,
    "--no-progress",
]
PAIRS_COUNT, PAIRS_SHARD = 12, 2
PAIRS_OPTIONS = [
    "--count",
    str(PAIRS_COUNT),
    "--steps",
    "3",
    "--cfg",
    "3",
    "--width",
    "64",
    "--height",
    "64",
    "--batch-size",
    "2",
    "--shard-size",
    str(PAIRS_SHARD),
    "--seed",
    "0",
    "--no-progress",
]
TMP = re.compile(r"^\.(?P<file>.+)\.(?P<pid>\d+)\.tmp$")  # training.files.atomic_write's temporary names


# ---------------------------------------------------------------------- processes
def cli_env() -> dict:
    # one thread: the runs are bit-reproducible and leave the second core to the rest of the machine
    return {
        **os.environ,
        "COMFYUI_PATH": str(COMFYUI),
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }


@dataclasses.dataclass
class Ran:
    rc: int
    marker_s: float | None  # seconds from the start to the marker file's appearance
    exit_s: float  # seconds from the start to the exit (or the kill)
    killed: bool
    log: str


def run_cli(args: list, marker: pathlib.Path, log: pathlib.Path, kill_after: float | None = None) -> Ran:
    """``python -m training ARGS`` from the repository root; with ``kill_after`` SIGKILLed that many
    seconds after ``marker`` appears (unless it exits first)."""
    start = time.perf_counter()
    marker_at, killed = None, False
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "training", *map(str, args)],
            cwd=ROOT,
            env=cli_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            while proc.poll() is None:
                now = time.perf_counter()
                if marker_at is None and marker.exists():
                    marker_at = now
                if kill_after is not None and marker_at is not None:
                    left = marker_at + kill_after - time.perf_counter()
                    if left > 0.003:
                        time.sleep(min(left - 0.002, 0.002))
                        continue
                    while time.perf_counter() < marker_at + kill_after:
                        pass
                    if proc.poll() is None:
                        os.kill(proc.pid, signal.SIGKILL)
                        killed = True
                    proc.wait()
                    break
                if now - start > PROCESS_TIMEOUT_S:
                    raise AssertionError(
                        f"python -m training {' '.join(map(str, args))} ran over {PROCESS_TIMEOUT_S} s"
                    )
                time.sleep(0.002)
        finally:
            if proc.poll() is None:  # only on a failure above: never leave the child behind
                proc.kill()
                proc.wait()
    end = time.perf_counter()
    if marker_at is None and marker.exists():
        marker_at = end
    return Ran(
        proc.returncode,
        None if marker_at is None else marker_at - start,
        end - start,
        killed,
        log.read_text(encoding="utf-8", errors="replace"),
    )


def kill_at_random(
    rng: random.Random,
    span: float,
    args: list,
    out: pathlib.Path,
    marker: pathlib.Path,
    log: pathlib.Path,
    tries: int = 3,
) -> tuple[Ran, float, str]:
    """Run ``args`` and SIGKILL it at a moment drawn uniformly from the ``span`` seconds after
    ``marker`` appears; a run that exits by itself first (it ran faster than the reference) is no
    kill: its folder is cleared and a new moment drawn (up to ``tries``). Returns the run, the
    moment and the moments drawn as text."""
    drawn = []
    for _ in range(tries):
        delay = rng.uniform(0.0, span)
        drawn.append(f"{delay:.2f}")
        ran = run_cli(args, marker, log, kill_after=delay)
        if ran.killed:
            break
        drawn[-1] += " (exited first)"
        shutil.rmtree(out, ignore_errors=True)
    return ran, delay, ", ".join(drawn)


def log_tail(text: str, lines: int = 8) -> str:
    kept = [line for line in text.splitlines() if not line.startswith("INFO:")]
    return "\n".join(kept[-lines:])


# ---------------------------------------------------------------------- files on disk
def temporary_files(folder: pathlib.Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.tmp"))


def corrupt_files(folder: pathlib.Path) -> tuple[list[str], list[str]]:
    """(problems, tolerated): every file under a final name in ``folder`` is read the way its
    reader reads it; a temporary file (``.<name>.<pid>.tmp``) is no final name. A partial last line
    of a ``.jsonl`` (no newline at its end) is tolerated (the resume rewrites it), any other bad
    line is a problem."""
    problems, tolerated = [], []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name.endswith(".tmp"):
            continue
        name = path.relative_to(folder).as_posix()
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), "pt") as f:
                    f.metadata()
                    for key in f.keys():
                        f.get_tensor(key)
            elif path.suffix == ".d2fstate":
                state = torch.load(path, map_location="cpu", weights_only=True)
                assert isinstance(state, dict) and "step" in state, "no step in the state"
            elif path.suffix == ".toml":
                tomllib.loads(path.read_text(encoding="utf-8"))
            elif path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
            elif path.suffix == ".png":
                with Image.open(path) as image:
                    image.load()
            elif path.suffix == ".jsonl":
                text = path.read_text(encoding="utf-8")
                lines = text.splitlines()
                partial = bool(text) and not text.endswith("\n")
                for i, line in enumerate(lines):
                    try:
                        json.loads(line)
                    except ValueError:
                        if partial and i == len(lines) - 1:
                            tolerated.append(f"{name}: partial last line {line!r}")
                        else:
                            raise ValueError(f"line {i + 1} is not JSON: {line!r}") from None
        except Exception as exc:
            problems.append(f"{name}: {type(exc).__name__}: {str(exc)[:200]}")
    return problems, tolerated


def tensors(path: pathlib.Path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def differences(a: dict, b: dict, what: str) -> list[str]:
    if a.keys() != b.keys():
        return [f"{what}: keys differ ({sorted(set(a) ^ set(b))[:4]})"]
    return [
        f"{what}: {k} differs (max |diff| {(a[k].double() - b[k].double()).abs().max().item():.3g})"
        for k in sorted(a)
        if not torch.equal(a[k], b[k])
    ][:4]


def metrics_of(folder: pathlib.Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []


def state_step(path: pathlib.Path) -> int | None:
    return int(torch.load(path, map_location="cpu", weights_only=True)["step"]) if path.is_file() else None


def periodic_steps(folder: pathlib.Path) -> list[int]:
    return sorted(
        int(m.group(1)) for p in folder.iterdir() if (m := re.fullmatch(rf"{NAME}_(\d{{6}})\.safetensors", p.name))
    )


def pending(folder: pathlib.Path) -> list[str]:
    """The final names of the temporary files in ``folder`` (what was being written)."""
    return sorted(TMP.match(p.name).group("file") for p in folder.rglob("*.tmp") if TMP.match(p.name))


def train_landing(out: pathlib.Path) -> str:
    """Where a kill of ``train`` landed, read from its files: the last step in metrics.jsonl, the
    step of the state, the final LoRA, the temporary files, and whether loss.png (the last file of
    a save) is newer than the state."""
    done = []
    if (out / "metrics.jsonl").is_file():
        for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
            try:
                done.append(json.loads(line)["step"])
            except ValueError:  # a partial last line: its step did not finish being logged
                pass
    last = max(done, default=0)
    saved = state_step(out / f"{NAME}.d2fstate")
    writing = pending(out)
    detail = f" (writing {', '.join(writing)})" if writing else ""
    if (out / f"{NAME}.safetensors").exists():
        return "at the end: after the final LoRA" + detail
    if last == 0:
        return "mid-step 1 (before the first save)" + detail
    if saved is None or saved < last:
        return f"mid-save {last}: before its state" + detail
    loss_png = out / "loss.png"
    curve_after_state = (
        loss_png.exists() and loss_png.stat().st_mtime_ns >= (out / f"{NAME}.d2fstate").stat().st_mtime_ns
    )
    if saved == TRAIN_STEPS:
        return (
            "after the final state, before the final LoRA"
            if curve_after_state
            else f"mid-save {saved}: after the final state, before loss.png"
        ) + detail
    if not curve_after_state:
        return f"mid-save {saved}: after its state (pruning / loss.png)" + detail
    return f"mid-step {saved + 1}" + detail


def landing_kind(landing: str) -> str:
    for kind in (
        "before the first save",
        "after the final state",
        "at the end",
        "mid-save",
        "mid-step",
        "before the first shard",
        "mid-shard",
        "after the last shard",
        "at the manifest",
    ):
        if kind in landing:
            return kind
    return landing


def summary(landings: list[str]) -> str:
    counts = collections.Counter(landing_kind(x) for x in landings)
    return ", ".join(f"{n} {kind}" for kind, n in counts.most_common())


# ---------------------------------------------------------------------- (a) train
@pytest.fixture(scope="module")
def cache(tiny_sd15_file, tmp_path_factory) -> pathlib.Path:
    """A latent cache of four 64x64 captioned images, made once by ``python -m training prepare``."""
    import numpy as np

    data = tmp_path_factory.mktemp("faults_data")
    gen = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray((gen.random((64, 64, 3)) * 255).astype(np.uint8)).save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text(f"a photo of thing {i}", encoding="utf-8")
    folder = tmp_path_factory.mktemp("faults_cache")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "training",
            "prepare",
            "--dataset",
            str(data),
            "--checkpoint",
            str(tiny_sd15_file),
            "--cache",
            str(folder),
            "--resolution",
            "64",
            "--no-progress",
        ],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


def check_the_checker(reference: pathlib.Path, scratch: pathlib.Path) -> None:
    """The corruption check catches a truncated copy of each kind of file (so it can fail)."""
    copy = scratch / "truncated"
    shutil.copytree(reference, copy)
    assert corrupt_files(copy) == ([], [])
    for name in (f"{NAME}.safetensors", f"{NAME}.d2fstate", "loss.png"):
        data = (copy / name).read_bytes()
        (copy / name).write_bytes(data[: len(data) // 2])
    toml = (copy / f"{NAME}.toml").read_text(encoding="utf-8")
    (copy / f"{NAME}.toml").write_text(toml[: toml.index('"') + 4], encoding="utf-8")  # inside a quoted value
    lines = (copy / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    (copy / "metrics.jsonl").write_text("\n".join([lines[0], lines[1][:10], *lines[2:]]) + "\n", encoding="utf-8")
    problems, _ = corrupt_files(copy)
    named = {p.split(":")[0] for p in problems}
    assert named == {f"{NAME}.safetensors", f"{NAME}.d2fstate", "loss.png", f"{NAME}.toml", "metrics.jsonl"}, problems
    # a partial LAST line is tolerated, not a problem
    (copy / "metrics.jsonl").write_text("\n".join(lines) + "\n" + lines[0][:9], encoding="utf-8")
    problems, tolerated = corrupt_files(copy)
    assert "metrics.jsonl" not in {p.split(":")[0] for p in problems} and len(tolerated) == 1


@dataclasses.dataclass
class TrainReference:
    folder: pathlib.Path
    files: list[str]
    lora: dict
    metadata: dict
    saves: dict[int, dict]
    losses: list[float]

    @classmethod
    def of(cls, folder: pathlib.Path) -> TrainReference:
        return cls(
            folder,
            sorted(p.name for p in folder.iterdir()),
            *tensors(folder / f"{NAME}.safetensors"),
            {s: tensors(folder / f"{NAME}_{s:06d}.safetensors")[0] for s in periodic_steps(folder)},
            [m["loss"] for m in metrics_of(folder)],
        )

    def compare(self, out: pathlib.Path, finished: Ran) -> list[str]:
        """What differs in ``out`` after ``finished`` from the uninterrupted run (empty: nothing)."""
        wrong = []
        if finished.rc != 0:
            wrong.append(f"finish exit code {finished.rc}: {log_tail(finished.log, 3)}")
        else:
            wrong += [f"corrupt after the finish: {p}" for p in corrupt_files(out)[0]]
            if (out / f"{NAME}.safetensors").is_file():
                lora, meta = tensors(out / f"{NAME}.safetensors")
                wrong += differences(self.lora, lora, f"{NAME}.safetensors")
                wrong += (
                    [] if meta == self.metadata else [f"{NAME}.safetensors metadata differs: {meta} vs {self.metadata}"]
                )
            else:
                wrong.append(f"no {NAME}.safetensors after the finish")
            if periodic_steps(out) != sorted(self.saves):
                wrong.append(
                    f"periodic saves {periodic_steps(out)}, expected the last {KEEP_LAST}: {sorted(self.saves)}"
                )
            else:
                for s, expected in self.saves.items():
                    wrong += differences(expected, tensors(out / f"{NAME}_{s:06d}.safetensors")[0], f"{NAME}_{s:06d}")
            if state_step(out / f"{NAME}.d2fstate") != TRAIN_STEPS:
                wrong.append(f"the state is at step {state_step(out / f'{NAME}.d2fstate')}, not {TRAIN_STEPS}")
            try:
                losses = [m["loss"] for m in metrics_of(out)]
            except ValueError as exc:
                losses = [f"unreadable: {exc}"]
            if losses != self.losses:
                wrong.append(f"metrics.jsonl losses {losses} differ from the reference's {self.losses}")
            names = sorted(p.name for p in out.iterdir() if not p.name.endswith(".tmp"))
            if names != self.files:
                wrong.append(f"files {names} differ from the reference's {self.files}")
        still = temporary_files(out)
        if still:
            wrong.append(f"temporary files left after the finish: {still}")
        return wrong


def test_train_survives_sigkill_at_random_points_and_resumes_to_the_same_lora(cache, tiny_sd15_file, tmp_path) -> None:
    base = ["train", "--cache", cache, "--checkpoint", tiny_sd15_file, *TRAIN_OPTIONS]
    ref = tmp_path / "reference"
    reference = run_cli([*base, "--output", ref], ref / f"{NAME}.toml", tmp_path / "reference.log")
    assert reference.rc == 0, log_tail(reference.log, 30)
    expected = TrainReference.of(ref)
    assert expected.files == sorted(
        [
            f"{NAME}.d2fstate",
            f"{NAME}.safetensors",
            f"{NAME}.toml",
            "loss.png",
            "metrics.jsonl",
            *(f"{NAME}_{s:06d}.safetensors" for s in range(TRAIN_STEPS - KEEP_LAST + 1, TRAIN_STEPS + 1)),
        ]
    )
    check_the_checker(ref, tmp_path)

    span = reference.exit_s - reference.marker_s  # training, saves and exit, after ComfyUI and the checkpoint loaded
    rng = random.Random(SEED)
    rows, failures, landings, failed = [], [], [], set()
    for k in range(KILLS):
        out = tmp_path / f"kill{k}"
        killed, delay, redrawn = kill_at_random(
            rng, span, [*base, "--output", out], out, out / f"{NAME}.toml", tmp_path / f"kill{k}.log"
        )
        if not killed.killed:
            rows.append(f"| {k} | {redrawn} | exited by itself (rc {killed.rc}) before every kill drawn | | | |")
            failures.append(f"kill {k}: the run exited (rc {killed.rc}) before every kill drawn ({redrawn})")
            failed.add(k)
            continue
        landing = train_landing(out)
        landings.append(landing)
        problems, tolerated = corrupt_files(out)
        left = temporary_files(out)
        state = out / f"{NAME}.d2fstate"
        if state.is_file():
            finish = ["train", "--config", out / f"{NAME}.toml", "--resume", state, "--no-progress"]
            how = f"--resume (state at step {state_step(state)})"
        else:
            finish = [*base, "--output", out, "--overwrite"]
            how = "--overwrite (no state)"
        done = run_cli(finish, out / f"{NAME}.toml", tmp_path / f"finish{k}.log")
        wrong = [f"corrupt after the kill: {p}" for p in problems] + expected.compare(out, done)
        failures += [f"kill {k} at +{delay:.2f} s ({landing}): {w}" for w in wrong]
        failed |= {k} if wrong else set()
        rows.append(
            f"| {k} | {redrawn} | {landing} | {', '.join(left) or '-'}"
            f"{' / ' + '; '.join(tolerated) if tolerated else ''} | {how} | "
            f"{'ok' if not wrong else 'FAILED: ' + wrong[0][:120]} |"
        )

    # targeted, not random: two rare kill points made by hand (dead pids in the temporary names)
    # 1. after the last step's periodic save wrote its state, before keep_last pruned, while the final LoRA was written
    final = tmp_path / "final_state"
    shutil.copytree(ref, final)
    (final / f"{NAME}.safetensors").unlink()
    shutil.copy(
        ref / f"{NAME}_{TRAIN_STEPS:06d}.safetensors", final / f"{NAME}_{TRAIN_STEPS - KEEP_LAST:06d}.safetensors"
    )
    (final / f".{NAME}.safetensors.999999.tmp").write_bytes((ref / f"{NAME}.safetensors").read_bytes()[:1000])
    # 2. while step 1's periodic LoRA was written, before any state existed
    first = tmp_path / "first_save"
    first.mkdir()
    shutil.copy(ref / f"{NAME}.toml", first / f"{NAME}.toml")
    (first / "metrics.jsonl").write_text(
        (ref / "metrics.jsonl").read_text(encoding="utf-8").splitlines()[0] + "\n", encoding="utf-8"
    )
    (first / f".{NAME}_000001.safetensors.999998.tmp").write_bytes((ref / f"{NAME}.safetensors").read_bytes()[:1000])
    targeted = {
        "after the final state, before pruning, final LoRA mid-write": (
            final,
            f"--resume (state at step {TRAIN_STEPS})",
            [
                "train",
                "--config",
                final / f"{NAME}.toml",
                "--resume",
                final / f"{NAME}.d2fstate",
                "--output",
                final,
                "--no-progress",
            ],
        ),
        "mid-save 1: its LoRA mid-write, no state yet": (
            first,
            "--overwrite (no state)",
            [*base, "--output", first, "--overwrite"],
        ),
    }
    targeted_ok = 0
    for what, (out, how, finish) in targeted.items():
        left = temporary_files(out)
        wrong = expected.compare(out, run_cli(finish, out / f"{NAME}.toml", tmp_path / f"{out.name}.log"))
        failures += [f"targeted ({what}): {w}" for w in wrong]
        targeted_ok += not wrong
        rows.append(
            f"| targeted | - | {what} (files made by hand) | {', '.join(left)} | {how} | "
            f"{'ok' if not wrong else 'FAILED: ' + wrong[0][:120]} |"
        )

    print(f"\n### train: {KILLS} SIGKILLs (seed {SEED})\n")
    print(
        f"reference: {reference.exit_s:.1f} s from process start to exit; ComfyUI + checkpoint loaded (NAME.toml "
        f"written) at {reference.marker_s:.1f} s; kills uniform over the {span:.1f} s after that\n"
    )
    print("| kill | at +s | landed | temporary files after the kill | finished with | result |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(
        f"\nlanded: {summary(landings)}; survived (exit 0, equal to the reference tensor for tensor, the last "
        f"{KEEP_LAST} saves kept, no *.tmp): {KILLS - len(failed)} of {KILLS}; targeted cases: "
        f"{targeted_ok} of {len(targeted)}\n"
    )
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------------- (a) pairs
def pairs_landing(out: pathlib.Path) -> str:
    shards = sorted(out.glob("pairs-*.safetensors"))
    writing = pending(out)
    detail = f" (writing {', '.join(writing)})" if writing else ""
    total = PAIRS_COUNT // PAIRS_SHARD
    if (out / "pairs.toml").exists():
        return "at the end: after pairs.toml" + detail
    if len(shards) == total:
        count = json.loads((out / "manifest.json").read_text())["count"]
        return (
            "after the last shard, before the final manifest"
            if count < PAIRS_COUNT
            else "at the manifest: after the final manifest, before pairs.toml"
        ) + detail
    if not shards and not any(w.startswith("pairs-") for w in writing):
        return "before the first shard: mid-shard 1" + detail
    return f"mid-shard {len(shards) + 1} of {total}" + detail


def test_pairs_survive_sigkill_at_random_points_and_rerun_to_the_same_pairs(tiny_sd15_file, tmp_path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n\na drawing of a house\n", encoding="utf-8")
    base = ["pairs", "--checkpoint", tiny_sd15_file, "--prompts", prompts, *PAIRS_OPTIONS]
    ref = tmp_path / "reference"
    reference = run_cli([*base, "--output", ref], ref / "manifest.json", tmp_path / "reference.log")
    assert reference.rc == 0, log_tail(reference.log, 30)
    expected = load_pairs(ref)
    assert expected.index.tolist() == list(range(PAIRS_COUNT))
    ref_files = sorted(p.name for p in ref.iterdir())
    ref_manifest = json.loads((ref / "manifest.json").read_text())
    # the corruption check catches a truncated shard (so it can fail)
    copy = tmp_path / "truncated"
    shutil.copytree(ref, copy)
    shard = sorted(copy.glob("pairs-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    (copy / "manifest.json").write_text((copy / "manifest.json").read_text()[:-5])
    assert {p.split(":")[0] for p in corrupt_files(copy)[0]} == {shard.name, "manifest.json"}

    span = (
        reference.exit_s - reference.marker_s
    )  # sampling and shard writes, after ComfyUI, the checkpoint and the prompts
    rng = random.Random(SEED + 1)
    rows, failures, landings, failed = [], [], [], set()
    for k in range(KILLS):
        out = tmp_path / f"kill{k}"
        killed, delay, redrawn = kill_at_random(
            rng, span, [*base, "--output", out], out, out / "manifest.json", tmp_path / f"kill{k}.log"
        )
        if not killed.killed:
            rows.append(f"| {k} | {redrawn} | exited by itself (rc {killed.rc}) before every kill drawn | | |")
            failures.append(f"kill {k}: the run exited (rc {killed.rc}) before every kill drawn ({redrawn})")
            failed.add(k)
            continue
        landing = pairs_landing(out)
        landings.append(landing)
        shards_after_kill = len(list(out.glob("pairs-*.safetensors")))
        problems, _ = corrupt_files(out)
        left = temporary_files(out)
        done = run_cli([*base, "--output", out], out / "manifest.json", tmp_path / f"finish{k}.log")
        wrong = [f"corrupt after the kill: {p}" for p in problems]
        if done.rc != 0:
            wrong.append(f"rerun exit code {done.rc}: {log_tail(done.log, 3)}")
        else:
            wrong += [f"corrupt after the rerun: {p}" for p in corrupt_files(out)[0]]
            got = load_pairs(out)
            for field in ("index", "prompt", "noise", "latents"):
                if not torch.equal(getattr(got, field), getattr(expected, field)):
                    wrong.append(f"pairs' {field} differ from the reference's")
            manifest = json.loads((out / "manifest.json").read_text())
            if (manifest["count"], manifest["settings"]) != (ref_manifest["count"], ref_manifest["settings"]):
                wrong.append(f"manifest count / settings differ: {manifest['count']}")
            wrong += differences(
                load_file(str(ref / "conds.safetensors")),
                load_file(str(out / "conds.safetensors")),
                "conds.safetensors",
            )
            names = sorted(p.name for p in out.iterdir() if not p.name.endswith(".tmp"))
            if names != ref_files:
                wrong.append(f"files {names} differ from the reference's {ref_files}")
        still = temporary_files(out)
        if still:
            wrong.append(f"temporary files left after the rerun: {still}")
        failures += [f"kill {k} at +{delay:.2f} s ({landing}): {w}" for w in wrong]
        failed |= {k} if wrong else set()
        rows.append(
            f"| {k} | {redrawn} | {landing}; {shards_after_kill} shards kept | {', '.join(left) or '-'} | "
            f"{'ok' if not wrong else 'FAILED: ' + wrong[0][:120]} |"
        )

    # targeted, not random (dead pids in the temporary names): the files of a kill while the manifest was
    # rewritten, the last shard not written yet, and of an earlier kill while pairs.toml was written
    out = tmp_path / "manifest_write"
    shutil.copytree(ref, out)
    last = sorted(out.glob("pairs-*.safetensors"))[-1]
    last.unlink()
    (out / "pairs.toml").unlink()
    (out / ".manifest.json.999997.tmp").write_text((ref / "manifest.json").read_text()[:50], encoding="utf-8")
    (out / ".pairs.toml.999996.tmp").write_text(
        (ref / "pairs.toml").read_text()[:50], encoding="utf-8"
    )  # an earlier kill's
    done = run_cli([*base, "--output", out], out / "manifest.json", tmp_path / "manifest_write.log")
    wrong = [f"rerun exit code {done.rc}: {log_tail(done.log, 3)}"] if done.rc else []
    if not done.rc and not torch.equal(load_pairs(out).latents, expected.latents):
        wrong.append("pairs' latents differ from the reference's")
    if temporary_files(out):
        wrong.append(f"temporary files left after the rerun: {temporary_files(out)}")
    failures += [f"targeted (kills while manifest.json / pairs.toml were written): {w}" for w in wrong]
    rows.append(
        f"| targeted | - | mid-write of manifest.json (and earlier of pairs.toml), the last shard missing (files made "
        f"by hand) | .manifest.json.999997.tmp, .pairs.toml.999996.tmp | {'ok' if not wrong else 'FAILED: ' + wrong[0][:120]} |"
    )

    print(f"\n### pairs: {KILLS} SIGKILLs (seed {SEED + 1})\n")
    print(
        f"reference: {reference.exit_s:.1f} s from process start to exit; ComfyUI, checkpoint and prompts ready "
        f"(manifest.json written) at {reference.marker_s:.1f} s; kills uniform over the {span:.1f} s after that\n"
    )
    print("| kill | at +s | landed | temporary files after the kill | result |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    print(
        f"\nlanded: {summary(landings)}; survived (rerun exit 0, pairs identical to the reference, no *.tmp): "
        f"{KILLS - len(failed)} of {KILLS}; targeted case: {'ok' if not wrong else 'FAILED'}\n"
    )
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------------- (b) soak
SOAK_RUNS = 10
SOAK_OPTIONS = dict(
    steps=6,
    batch_size=2,
    rank=4,
    learning_rate=1e-3,
    targets="attention",
    seed=3,
    save_every=2,
    keep_last=2,
    preview_every=3,
    preview_width=64,
    preview_height=64,
    preview_steps=2,
    preview_cfg=2.0,
    preview_seed=5,
)


def resident_bytes() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:  # pragma: no cover - psutil comes with ComfyUI's requirements
        return int(pathlib.Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_ten_node_trainings_in_one_process_level_off_memory_and_leave_no_temporary_files(
    comfy_nodes, tiny_sd15_file, loras_dir
) -> None:
    import comfy.sd

    model, _, vae = comfy.sd.load_checkpoint_guess_config(str(tiny_sd15_file), output_clip=False)[:3]
    node = comfy_nodes["D2F_TrainLoRA"]
    gen = torch.Generator().manual_seed(0)
    latents = {"samples": torch.randn(4, 4, 8, 8, generator=gen) * 3}

    def cond(seed: int) -> list:
        return [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(seed)), {}]]

    options = {k: [v] for k, v in TrainConfig(**SOAK_OPTIONS).to_dict().items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CLI runs above: no thread oversubscription on a shared machine
    try:
        soak(node, model, vae, latents, cond, options, loras_dir)
    finally:
        torch.set_num_threads(threads)


def soak(node, model, vae, latents: dict, cond, options: dict, loras_dir: pathlib.Path) -> None:
    import comfy.model_management

    rss, seconds, loaded = [], [], []
    gc.collect()
    before = resident_bytes()
    for i in range(SOAK_RUNS):
        start = time.perf_counter()
        result = node.execute(
            model=[model],
            latents=[latents],
            positive=[cond(1), cond(2), cond(3), cond(4)],
            negative=[[[torch.zeros(1, 77, 768), {}]]],
            vae=[vae],
            preview_prompts=[cond(100), cond(101)],
            output_name=[f"soak{i:02d}"],
            resume_from=["None"],
            **options,
        ).args
        seconds.append(time.perf_counter() - start)
        assert result[3] == SOAK_OPTIONS["steps"] and result[4].shape == (3, 64, 128, 3)  # previews at steps 0, 3, 6
        del result
        gc.collect()
        rss.append(resident_bytes())
        loaded.append(len(comfy.model_management.current_loaded_models))
        assert sorted(p.name for p in loras_dir.glob(f"soak{i:02d}*")) == [
            f"soak{i:02d}.d2fstate",
            f"soak{i:02d}_000004.safetensors",
            f"soak{i:02d}_000006.safetensors",
        ]
    growth = (rss[-1] - rss[1]) / rss[1]
    mib = [r / 2**20 for r in rss]
    print(f"\n### soak: {SOAK_RUNS} runs of Train Diff2Flow LoRA in one process\n")
    print(f"options: {SOAK_OPTIONS}; RSS before the first run {before / 2**20:.0f} MiB\n")
    print("| run | RSS after (MiB) | change from the run before (MiB) | seconds | models loaded in ComfyUI |")
    print("|---|---|---|---|---|")
    for i, (m, s, n) in enumerate(zip(mib, seconds, loaded)):
        print(f"| {i + 1} | {m:.1f} | {m - (mib[i - 1] if i else before / 2**20):+.1f} | {s:.1f} | {n} |")
    print(f"\ngrowth from after run 2 to after run {SOAK_RUNS}: {100 * growth:+.2f} % ({mib[-1] - mib[1]:+.1f} MiB)\n")
    assert not temporary_files(loras_dir), temporary_files(loras_dir)
    assert growth < 0.05, (
        f"resident memory grew {100 * growth:.1f} % from run 2 to run {SOAK_RUNS}: {[round(m) for m in mib]} MiB"
    )
