"""nodes/progress.py: the per-run loss history the server keeps for the training node's chart (the
training loss of every step and the validation losses), its ``GET /diff2flow/training/history``
route, ``report_progress`` and ``report_validation``.

The module is loaded from its file (it imports nothing from ComfyUI at the top), so the store tests
run without ComfyUI; the route test needs aiohttp (a ComfyUI requirement) and the report test
ComfyUI's ``comfy_execution`` (its executing-node context), each skipped with the reason otherwise.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import json
import math
import random
import sys
import types

import pytest
from comfy_harness import COMFYUI, ROOT


def load_progress():
    spec = importlib.util.spec_from_file_location("d2f_progress_under_test", ROOT / "nodes" / "progress.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


progress = load_progress()


def fill(store, node, prompt, losses, steps=None, start=1):
    for i, loss in enumerate(losses):
        store.record(node, prompt, start + i, steps or start + len(losses) - 1, loss, 1e-4, now=100.0 + i)


def test_history_is_bounded_and_keeps_every_spike_and_dip() -> None:
    rng = random.Random(0)
    losses = [0.2 + 0.02 * rng.random() for _ in range(5000)]
    spikes = {137: 9.0, 2500: 7.5, 4999: 5.0}
    dips = {1000: -3.0, 3333: -4.0}
    for i, v in {**spikes, **dips}.items():
        losses[i] = v
    store = progress.ProgressStore(max_points=64)
    fill(store, "5", "p1", losses)
    (run,) = store.snapshot()
    points = run["points"]
    assert len(points) <= 64 and run["stride"] > 1, (len(points), run["stride"])
    # buckets tile the steps 1..5000 in order, without gaps or overlaps
    assert points[0][0] == 1 and points[-1][1] == 5000
    assert all(b[0] == a[1] + 1 for a, b in zip(points, points[1:]))
    for i, v in {**spikes, **dips}.items():
        step = i + 1
        bucket = next(p for p in points if p[0] <= step <= p[1])
        assert (bucket[3] if v > 0 else bucket[2]) == v, f"step {step} ({v}) lost in {bucket}"
    assert max(p[3] for p in points) == max(losses) and min(p[2] for p in points) == min(losses)
    # each bucket's range is exactly its steps' range, its last loss the loss of its last step
    for p in points[:: max(1, len(points) // 7)]:
        chunk = losses[p[0] - 1 : p[1]]
        assert (p[2], p[3], p[4]) == (min(chunk), max(chunk), chunk[-1])
    assert run["step"] == 5000 and run["loss"] == losses[-1] and run["finished"]


def test_smoothed_loss_is_the_debiased_ema() -> None:
    losses = [1.0, 0.5, 0.8, 0.2, 0.4]
    store = progress.ProgressStore(smoothing=0.6)
    events = [store.record("3", "p", i + 1, 5, v, 1e-4) for i, v in enumerate(losses)]
    ema = 0.0
    for n, (v, event) in enumerate(zip(losses, events), start=1):
        ema = 0.6 * ema + 0.4 * v
        assert event["smooth"] == pytest.approx(ema / (1 - 0.6**n))
    assert events[0]["smooth"] == pytest.approx(1.0)  # no pull towards 0 at the start
    assert [p[5] for p in store.snapshot()[0]["points"]] == pytest.approx([e["smooth"] for e in events])


def test_runs_of_two_nodes_and_two_prompts_stay_apart() -> None:
    store = progress.ProgressStore()
    fill(store, "4", "pa", [1.0, 2.0, 3.0])
    fill(store, "9", "pa", [7.0, 8.0])
    fill(store, "4", "pb", [0.5])
    runs = {(r["node"], r["prompt_id"]): r for r in store.snapshot()}
    assert set(runs) == {("4", "pa"), ("9", "pa"), ("4", "pb")}
    assert [p[4] for p in runs[("4", "pa")]["points"]] == [1.0, 2.0, 3.0]
    assert [p[4] for p in runs[("9", "pa")]["points"]] == [7.0, 8.0]
    assert [r["prompt_id"] for r in store.snapshot("4")] == ["pa", "pb"]  # oldest update first
    assert store.snapshot("9")[0]["step"] == 2 and store.snapshot("12") == []


def test_store_keeps_the_most_recent_runs_only() -> None:
    store = progress.ProgressStore(max_runs=3)
    for k in range(5):
        fill(store, str(k), f"p{k}", [float(k)])
    fill(store, "2", "p2", [9.0], start=2)  # run 2 updated last: kept
    assert [r["node"] for r in store.snapshot()] == ["3", "4", "2"]


def test_eta_elapsed_and_a_non_finite_loss() -> None:
    run = progress.RunHistory("1", "p", steps=10)
    for step in (1, 2, 3, 4):
        run.add(step, 10, 0.5, 1e-4, now=1000.0 + 2.0 * step)  # 2 s per step, first report 2 s after the start
    assert run.elapsed_s == pytest.approx(8.0)  # 6 s since the first report + the first step (one average step)
    assert run.eta_s == pytest.approx(2.0 * 6)
    run.add(5, 10, float("nan"), 1e-4, now=1010.0)
    assert run.loss is None and run.step == 5 and len(run.points) == 4
    json.dumps(run.as_dict(), allow_nan=False)  # valid JSON for the page


def test_bad_store_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="max_points"):
        progress.RunHistory("1", "p", 10, max_points=1)
    with pytest.raises(ValueError, match="smoothing"):
        progress.ProgressStore(smoothing=1.0)
    with pytest.raises(ValueError, match="max_runs"):
        progress.ProgressStore(max_runs=0)


def test_validation_losses_are_kept_whole_beside_the_downsampled_steps() -> None:
    store = progress.ProgressStore(max_points=4)
    event = store.record_validation("5", "p", 0, 40, 0.9, workflow="wf", now=99.0)  # before the first step
    assert event == {"node": "5", "prompt_id": "p", "workflow": "wf", "step": 0, "steps": 40, "val_loss": 0.9}
    for step in range(1, 41):
        store.record("5", "p", step, 40, 1.0 / step, 1e-4, now=100.0 + step)
        if step % 10 == 0:
            event = store.record_validation("5", "p", step, 40, 0.5 / step, now=100.5 + step)
            assert (event["step"], event["val_loss"]) == (step, 0.5 / step)
    (run,) = store.snapshot()
    assert len(run["points"]) <= 4  # the steps are merged in buckets ...
    assert run["validation"] == [[0, 0.9], [10, 0.05], [20, 0.025], [30, 0.5 / 30], [40, 0.0125]]  # ... these never
    assert run["val_loss"] == 0.0125 and run["step"] == 40 and run["finished"]
    assert run["workflow"] == "wf"  # from the run's first report, the validation at step 0
    json.dumps(run, allow_nan=False)


def test_a_validation_at_step_0_starts_the_run_its_steps_continue() -> None:
    store = progress.ProgressStore()
    store.record_validation("5", "p", 0, 3, 0.8, now=100.0)
    (run,) = store.snapshot()
    assert (run["step"], run["steps"], run["points"], run["validation"]) == (None, 3, [], [[0, 0.8]])
    for step in (1, 2, 3):
        store.record("5", "p", step, 3, 0.5, 1e-4, now=100.0 + step)
    store.record_validation("5", "p", 3, 3, 0.4)  # the last step's validation, after its step
    (run,) = store.snapshot()  # one run: the step 1 after the validation at step 0 did not start another
    assert [p[0] for p in run["points"]] == [1, 2, 3] and run["validation"] == [[0, 0.8], [3, 0.4]]
    # the same prompt run again: its validation at step 0 starts a new run, which its step 1 continues
    store.record_validation("5", "p", 0, 3, 0.7)
    store.record("5", "p", 1, 3, 0.6, 1e-4)
    (run,) = store.snapshot()
    assert run["validation"] == [[0, 0.7]] and [p[0] for p in run["points"]] == [1] and run["val_loss"] == 0.7
    # a validation before its step's report (step 2, then step 2's report) stays in the run too
    store.record_validation("5", "p", 2, 3, 0.3)
    store.record("5", "p", 2, 3, 0.6, 1e-4)
    (run,) = store.snapshot()
    assert run["validation"] == [[0, 0.7], [2, 0.3]] and run["step"] == 2


def test_a_non_finite_validation_loss_is_not_recorded() -> None:
    store = progress.ProgressStore()
    assert store.record_validation("5", "p", 0, 3, float("nan")) is None
    assert store.snapshot() == []  # nothing: not even the run
    store.record("5", "p", 1, 3, 0.5, 1e-4)
    assert store.record_validation("5", "p", 1, 3, float("inf")) is None
    store.record_validation("5", "p", 2, 3, 0.25)
    assert store.record_validation("5", "p", 3, 3, float("-inf")) is None
    (run,) = store.snapshot()
    assert run["validation"] == [[2, 0.25]] and run["val_loss"] == 0.25
    json.dumps(run, allow_nan=False)


def run_async(coroutine):
    """asyncio.run in a thread of its own: the browser tests' Playwright keeps an event loop in this one."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result(timeout=60)


def test_history_route_answers_the_runs() -> None:
    pytest.importorskip("aiohttp", reason="aiohttp (a ComfyUI requirement) is not installed")
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    module = load_progress()  # a fresh STORE
    running = types.SimpleNamespace(
        get_current_queue_volatile=lambda: ([(0, "live", {}, {}, [], {}), (1, "last-val", {}, {}, [], {})], [])
    )
    server = types.SimpleNamespace(routes=web.RouteTableDef(), prompt_queue=running)
    assert module.register_routes(server) and module.register_routes(server)  # twice: one route
    assert len(list(server.routes)) == 1
    fill(module.STORE, "6", "live", [0.3, 0.2], steps=10)
    fill(module.STORE, "7", "over", [0.4, 0.1])
    module.STORE.record_validation("7", "over", 2, 2, 0.35)
    fill(module.STORE, "8", "last-val", [0.5, 0.4])  # the last step done, its validation still to come

    async def get(path):
        app = web.Application()
        app.add_routes(server.routes)
        async with TestClient(TestServer(app)) as client:
            response = await client.get(path)
            return response.status, await response.json()

    status, answer = run_async(get(module.HISTORY_ROUTE))
    assert status == 200
    runs = {r["node"]: r for r in answer["runs"]}
    assert runs["6"]["running"] is True and runs["6"]["finished"] is False and runs["6"]["step"] == 2
    assert runs["7"]["running"] is False and runs["7"]["finished"] is True
    assert [p[4] for p in runs["7"]["points"]] == [0.4, 0.1]
    assert (runs["7"]["validation"], runs["7"]["val_loss"]) == ([[2, 0.35]], 0.35)
    assert (runs["6"]["validation"], runs["6"]["val_loss"]) == ([], None)
    assert runs["8"]["finished"] is True and runs["8"]["running"] is True  # its prompt still executes
    status, answer = run_async(get(module.HISTORY_ROUTE + "?node=7"))
    assert [r["node"] for r in answer["runs"]] == ["7"]


def test_no_route_without_a_server() -> None:
    module = load_progress()
    assert module.register_routes(None) is False


@pytest.mark.skipif(
    COMFYUI is None, reason="ComfyUI not found (COMFYUI_PATH): report_progress reads its executing-node context"
)
def test_report_progress_records_under_the_executing_node_and_prompt(monkeypatch) -> None:
    from comfy_execution.utils import CurrentNodeContext

    module = load_progress()
    sent, bar = [], []
    queue = types.SimpleNamespace(
        get_current_queue_volatile=lambda: (
            [(0, "pr1", {}, {"extra_pnginfo": {"workflow": {"id": "wf-1"}}}, [], {})],
            [],
        )
    )
    instance = types.SimpleNamespace(send_sync=lambda event, data: sent.append((event, data)), prompt_queue=queue)
    monkeypatch.setitem(
        sys.modules, "server", types.SimpleNamespace(PromptServer=types.SimpleNamespace(instance=instance))
    )
    pbar = types.SimpleNamespace(update_absolute=lambda value, total: bar.append((value, total)))
    with CurrentNodeContext("pr1", "12"):
        for step, loss in ((1, 0.5), (2, 0.25)):
            module.report_progress(pbar, 4, step, loss, 1e-4)
    module.report_progress(pbar, 4, 3, 0.1, 1e-4)  # outside a prompt: the event only, no history
    assert bar == [(1, 4), (2, 4), (3, 4)]
    assert [e for e, _ in sent] == [module.PROGRESS_EVENT] * 3
    assert sent[1][1]["node"] == "12" and sent[1][1]["prompt_id"] == "pr1" and sent[1][1]["workflow"] == "wf-1"
    assert sent[2][1] == {"step": 3, "steps": 4, "loss": 0.1, "lr": 1e-4}
    (run,) = module.STORE.snapshot()
    assert (run["node"], run["prompt_id"], run["step"], run["workflow"]) == ("12", "pr1", 2, "wf-1")
    assert math.isclose(run["points"][-1][4], 0.25)


@pytest.mark.skipif(
    COMFYUI is None, reason="ComfyUI not found (COMFYUI_PATH): report_validation reads its executing-node context"
)
def test_report_validation_records_and_sends_the_validation_event(monkeypatch) -> None:
    from comfy_execution.utils import CurrentNodeContext

    module = load_progress()
    assert module.report_validation(4, 0, 0.5) is None  # no server: nothing, no error
    assert module.STORE.snapshot() == []
    sent = []
    queue = types.SimpleNamespace(
        get_current_queue_volatile=lambda: (
            [(0, "pr1", {}, {"extra_pnginfo": {"workflow": {"id": "wf-1"}}}, [], {})],
            [],
        )
    )
    instance = types.SimpleNamespace(send_sync=lambda event, data: sent.append((event, data)), prompt_queue=queue)
    monkeypatch.setitem(
        sys.modules, "server", types.SimpleNamespace(PromptServer=types.SimpleNamespace(instance=instance))
    )
    pbar = types.SimpleNamespace(update_absolute=lambda value, total: None)
    with CurrentNodeContext("pr1", "12"):
        module.report_validation(4, 0, 0.75)  # before the first step: the run's first report
        module.report_progress(pbar, 4, 1, 0.5, 1e-4)
        module.report_validation(4, 1, float("nan"))  # not recorded, not sent
        module.report_validation(4, 2, 0.25)
    module.report_validation(4, 3, 0.125)  # outside a prompt: the event only, no history
    assert [e for e, _ in sent] == [
        module.VALIDATION_EVENT,
        module.PROGRESS_EVENT,
        module.VALIDATION_EVENT,
        module.VALIDATION_EVENT,
    ]
    assert sent[0][1] == {"node": "12", "prompt_id": "pr1", "workflow": "wf-1", "step": 0, "steps": 4, "val_loss": 0.75}
    assert sent[1][1]["workflow"] == "wf-1" and sent[2][1]["val_loss"] == 0.25
    assert sent[3][1] == {"step": 3, "steps": 4, "val_loss": 0.125}
    (run,) = module.STORE.snapshot()
    assert (run["node"], run["prompt_id"], run["step"], run["workflow"]) == ("12", "pr1", 1, "wf-1")
    assert run["validation"] == [[0, 0.75], [2, 0.25]] and run["val_loss"] == 0.25
    answer = module.history_answer(instance)
    assert answer["runs"][0]["validation"] == [[0, 0.75], [2, 0.25]] and answer["runs"][0]["running"] is True
