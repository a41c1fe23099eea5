"""Live training progress for the page: the loss event of web/diff2flow.js and a bounded history
of each run that the page asks for when it (re)loads (``GET /diff2flow/training/history``).

Two events go to every page (ComfyUI's ``send_sync``), both named here and in web/diff2flow.js:

- ``PROGRESS_EVENT`` after every optimizer step (``report_progress``): ``RunHistory.event()``,
  {node, prompt_id, workflow, step, steps, loss, lr, smooth, eta_s, elapsed_s};
- ``VALIDATION_EVENT`` after every validation evaluation (``report_validation``):
  ``RunHistory.validation_event()``, {node, prompt_id, workflow, step, steps, val_loss}, the loss of
  the objective on the held-out samples after optimizer step ``step`` (0: before training).

Outside ComfyUI's executing-node context (no node, no prompt) the events carry only {step, steps,
loss, lr} and {step, steps, val_loss} and nothing is recorded.

A run is keyed by the node that trains (ComfyUI's unique id of the executing node, which is the id
of the node on the page) and the prompt id, so two training nodes, or two runs of one node, never
mix. Its history is downsampled as it grows: at most ``max_points`` buckets of consecutive steps,
each keeping the lowest, the highest and the last loss of its steps (spikes stay visible), and the
smoothed loss (TensorBoard's debiased exponential moving average, weight ``SMOOTHING``) at its
last step. Steps are the trainer's optimizer steps (1..steps); times are wall-clock seconds. The
validation losses are few (one per ``validation_every`` steps): each run keeps all of them, as
``[step, loss]`` pairs in ``validation``, beside ``val_loss``, the last of them.

A run is created by the first report of it, a step's or a validation's: the validation at step 0
comes before the first step. A report that cannot belong to the run kept under its key starts a
new one (the same prompt run again): a step at or below the run's last step, a validation below
the run's last step or at or below its last validation step.

Nothing here needs a server: ``report_progress`` and ``report_validation`` record and send only
when ComfyUI's ``PromptServer`` exists, and the route is registered only then. Non-finite losses
are not recorded (nor drawable, nor valid JSON): a step's is sent as ``None``, a validation's not
at all.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

PROGRESS_EVENT = "diff2flow.train.progress"
VALIDATION_EVENT = "diff2flow.train.validation"
HISTORY_ROUTE = "/diff2flow/training/history"
SMOOTHING = 0.95  # EMA weight of the smoothed curve (TensorBoard's slider; loss per step is noisy)
MAX_POINTS = 1024  # buckets kept per run: more than a chart is wide, so the page's own downsampling decides
MAX_RUNS = 16  # runs kept in all (the least recently updated goes first)

# one history bucket: [first step, last step, lowest loss, highest loss, last loss, smoothed loss at its last step]
Bucket = list


class RunHistory:
    """The progress of one training run: its last step and a downsampled loss history."""

    def __init__(
        self,
        node: str,
        prompt_id: str | None,
        steps: int,
        workflow: str | None = None,
        max_points: int = MAX_POINTS,
        smoothing: float = SMOOTHING,
    ):
        if max_points < 2:
            raise ValueError(f"max_points must be at least 2, got {max_points}")
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        self.node, self.prompt_id, self.steps, self.workflow = node, prompt_id, steps, workflow
        self.max_points, self.smoothing = max_points, smoothing
        self.points: list[Bucket] = []
        self.stride = 1  # steps per bucket; doubles each time the buckets are merged in pairs
        self.step: int | None = None
        self.first_step: int | None = None
        self.loss: float | None = None
        self.lr: float | None = None
        self.smooth: float | None = None
        self.started = self.updated = time.time()
        self.elapsed_s = 0.0
        self.eta_s: float | None = None
        self._ema, self._count = 0.0, 0
        self.validation: list[list] = []  # [step, loss] of every finite validation loss, in step order
        self.val_loss: float | None = None  # the loss of the last of them

    def new_run_at_validation(self, step: int) -> bool:
        """Can a validation at ``step`` not belong to this run (so it is the same prompt run again)?
        It comes after the report of its step or just before it, and once per step."""
        return (self.step is not None and step < self.step) or (
            bool(self.validation) and step <= self.validation[-1][0]
        )

    @property
    def finished(self) -> bool:
        return self.step is not None and self.step >= self.steps

    def add(self, step: int, steps: int, loss: float, lr: float, now: float | None = None) -> None:
        """Record optimizer step ``step`` of ``steps`` (steps come in increasing order)."""
        now = time.time() if now is None else now
        if self.first_step is None:
            self.first_step, self.started = step, now  # the clock starts at the first report, i.e. after one step
        self.step, self.steps, self.lr, self.updated = step, steps, lr, now
        self.loss = loss if math.isfinite(loss) else None
        done, since_first = step - self.first_step, max(0.0, now - self.started)
        per_step = since_first / done if done > 0 else None
        # elapsed: since the first report plus an estimate of the first step's time (one average step)
        self.elapsed_s = since_first + (per_step or 0.0)
        self.eta_s = per_step * max(0, steps - step) if per_step is not None else None
        if self.loss is None:
            return  # a non-finite loss is not drawable (and not valid JSON); the trainer stops on it
        self._ema = self.smoothing * self._ema + (1.0 - self.smoothing) * loss
        self._count += 1
        self.smooth = self._ema / (1.0 - self.smoothing**self._count)  # debiased: no pull towards 0 early on
        last = self.points[-1] if self.points else None
        if last is not None and step // self.stride == last[0] // self.stride:
            last[1], last[2], last[3], last[4], last[5] = (
                step,
                min(last[2], loss),
                max(last[3], loss),
                loss,
                self.smooth,
            )
        else:
            self.points.append([step, step, loss, loss, loss, self.smooth])
        if len(self.points) > self.max_points:
            self._halve()

    def add_validation(self, step: int, steps: int, loss: float, now: float | None = None) -> bool:
        """Record the validation loss after optimizer step ``step`` (0: before training); False (and
        nothing recorded) for a non-finite loss."""
        if not math.isfinite(loss):
            return False
        if self.step is None:
            self.steps = steps  # a run created by its validation at step 0 knows its length before its first step
        self.updated = time.time() if now is None else now
        self.validation = [p for p in self.validation if p[0] != step]
        self.validation.append([step, loss])
        self.validation.sort(key=lambda p: p[0])
        self.val_loss = self.validation[-1][1]
        return True

    def _halve(self) -> None:
        """Merge neighbouring buckets in pairs (aligned to the doubled stride): min of lows, max of highs."""
        self.stride *= 2
        merged: list[Bucket] = []
        for bucket in self.points:
            prev = merged[-1] if merged else None
            if prev is not None and bucket[0] // self.stride == prev[0] // self.stride:
                prev[1], prev[2], prev[3], prev[4], prev[5] = (
                    bucket[1],
                    min(prev[2], bucket[2]),
                    max(prev[3], bucket[3]),
                    bucket[4],
                    bucket[5],
                )
            else:
                merged.append(list(bucket))
        self.points = merged

    def event(self) -> dict[str, Any]:
        """The live event of the last step (what the page appends to its chart)."""
        return {
            "node": self.node,
            "prompt_id": self.prompt_id,
            "workflow": self.workflow,
            "step": self.step,
            "steps": self.steps,
            "loss": self.loss,
            "lr": self.lr,
            "smooth": self.smooth,
            "eta_s": self.eta_s,
            "elapsed_s": self.elapsed_s,
        }

    def validation_event(self, step: int) -> dict[str, Any]:
        """The live event of the validation at ``step`` (what the page adds to its validation series)."""
        loss = next((p[1] for p in self.validation if p[0] == step), None)
        return {
            "node": self.node,
            "prompt_id": self.prompt_id,
            "workflow": self.workflow,
            "step": step,
            "steps": self.steps,
            "val_loss": loss,
        }

    def as_dict(self) -> dict[str, Any]:
        """The whole run, JSON-ready (the history route's answer for it)."""
        return {
            **self.event(),
            "finished": self.finished,
            "stride": self.stride,
            "updated": self.updated,
            "points": [list(p) for p in self.points],
            "validation": [list(p) for p in self.validation],
            "val_loss": self.val_loss,
        }


class ProgressStore:
    """The runs the server keeps for the page, bounded to ``max_runs`` in all; thread-safe (the
    trainer records from the execution thread, the route reads from the server's event loop)."""

    def __init__(self, max_runs: int = MAX_RUNS, max_points: int = MAX_POINTS, smoothing: float = SMOOTHING):
        if max_runs < 1:
            raise ValueError(f"max_runs must be at least 1, got {max_runs}")
        RunHistory("check", None, 1, max_points=max_points, smoothing=smoothing)  # the same errors as a run's
        self.max_runs, self.max_points, self.smoothing = max_runs, max_points, smoothing
        self._runs: OrderedDict[tuple[str, str | None], RunHistory] = OrderedDict()
        self._lock = threading.Lock()

    def record(
        self,
        node: str,
        prompt_id: str | None,
        step: int,
        steps: int,
        loss: float,
        lr: float,
        workflow: str | None = None,
        now: float | None = None,
    ) -> dict[str, Any]:
        """Add one step of the run (``node``, ``prompt_id``); returns the live event for it."""
        with self._lock:
            # a step at or below the run's last one: a new run (the same prompt run again)
            run = self._current(node, prompt_id, steps, workflow, lambda r: r.step is not None and step <= r.step)
            run.add(step, steps, loss, lr, now)
            return run.event()

    def _current(
        self, node: str, prompt_id: str | None, steps: int, workflow: str | None, ended: Callable[[RunHistory], bool]
    ) -> RunHistory:
        """The run kept under (``node``, ``prompt_id``), or a new one when there is none or ``ended(run)``;
        made the most recent, the least recently updated run dropped beyond ``max_runs``. Under the lock."""
        key = (str(node), prompt_id)
        run = self._runs.get(key)
        if run is None or ended(run):
            run = RunHistory(str(node), prompt_id, steps, workflow, self.max_points, self.smoothing)
        self._runs[key] = run
        self._runs.move_to_end(key)
        while len(self._runs) > self.max_runs:
            self._runs.popitem(last=False)
        return run

    def record_validation(
        self,
        node: str,
        prompt_id: str | None,
        step: int,
        steps: int,
        loss: float,
        workflow: str | None = None,
        now: float | None = None,
    ) -> dict[str, Any] | None:
        """Add the validation loss after step ``step`` of the run (``node``, ``prompt_id``), creating the
        run when it is its first report; returns the live event for it, None for a non-finite loss."""
        if not math.isfinite(loss):
            return None
        with self._lock:
            run = self._current(node, prompt_id, steps, workflow, lambda r: r.new_run_at_validation(step))
            run.add_validation(step, steps, loss, now)
            return run.validation_event(step)

    def has_run(self, node: str, prompt_id: str | None) -> bool:
        with self._lock:
            return (str(node), prompt_id) in self._runs

    def snapshot(self, node: str | None = None) -> list[dict[str, Any]]:
        """Every kept run (of ``node`` only, when given), oldest update first."""
        with self._lock:
            return [run.as_dict() for (n, _), run in self._runs.items() if node is None or n == str(node)]

    def clear(self) -> None:
        with self._lock:
            self._runs.clear()


STORE = ProgressStore()


# ---------------------------------------------------------------------------------------------- server side
def prompt_server() -> Any:
    """ComfyUI's running PromptServer, or None (ComfyUI used as a library: tests, scripts). Looked up,
    never imported: ComfyUI's main.py imports ``server`` before it loads custom nodes, and importing
    it here would only slow down library use."""
    module = sys.modules.get("server")
    prompt_server_class = getattr(module, "PromptServer", None)
    return getattr(prompt_server_class, "instance", None)


def executing() -> tuple[str | None, str | None]:
    """(node id, prompt id) of the node ComfyUI is executing in this thread; (None, None) outside a prompt."""
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        return None, None
    context = get_executing_context()
    return (str(context.node_id), context.prompt_id) if context is not None else (None, None)


def running_prompts(server: Any) -> dict[str, dict] | None:
    """prompt id -> extra_data of the prompts the server runs now (None when it cannot tell)."""
    queue = getattr(server, "prompt_queue", None)
    try:
        running, _ = queue.get_current_queue_volatile()
        return {item[1]: item[3] if isinstance(item[3], dict) else {} for item in running}
    except (AttributeError, IndexError, TypeError):
        return None


def workflow_id(server: Any, prompt_id: str | None) -> str | None:
    """The id of the page's workflow the prompt came from (the page shows a run only on its own workflow)."""
    extra = (running_prompts(server) or {}).get(prompt_id) or {}
    workflow = (
        (extra.get("extra_pnginfo") or {}).get("workflow") if isinstance(extra.get("extra_pnginfo"), dict) else None
    )
    found = workflow.get("id") if isinstance(workflow, dict) else None
    return str(found) if found else None


def report_progress(pbar: Any, steps: int, step: int, loss: float, lr: float) -> None:
    """Progress to ComfyUI's bar and, when a server runs, to the run's history and the live loss
    event of the web extension (sent to every page, so a reloaded page keeps receiving it)."""
    pbar.update_absolute(step, steps)
    server = prompt_server()
    if server is None:
        return  # ComfyUI used as a library: the bar is all there is
    node, prompt_id = executing()
    if node is None:
        event = {"step": step, "steps": steps, "loss": loss, "lr": lr}
    else:
        workflow = None if STORE.has_run(node, prompt_id) else workflow_id(server, prompt_id)
        event = STORE.record(node, prompt_id, step, steps, float(loss), float(lr), workflow=workflow)
    server.send_sync(PROGRESS_EVENT, event)


def report_validation(steps: int, step: int, loss: float) -> None:
    """The validation loss of the run at optimizer step ``step`` of ``steps`` (0: before training):
    when a server runs, into the run's history and to the page's chart (``VALIDATION_EVENT``). A
    non-finite loss is neither recorded nor sent."""
    server = prompt_server()
    if server is None or not math.isfinite(float(loss)):
        return  # ComfyUI used as a library (metrics.jsonl has it), or nothing drawable
    node, prompt_id = executing()
    if node is None:
        event = {"step": step, "steps": steps, "val_loss": float(loss)}
    else:
        workflow = None if STORE.has_run(node, prompt_id) else workflow_id(server, prompt_id)
        event = STORE.record_validation(node, prompt_id, step, steps, float(loss), workflow=workflow)
    server.send_sync(VALIDATION_EVENT, event)


def history_answer(server: Any, node: str | None = None) -> dict[str, Any]:
    """The route's JSON: every kept run, each with ``running`` (its prompt still executes: after its last
    step too, when the last validation loss is still to come; None when the server cannot tell)."""
    running = running_prompts(server)
    runs = STORE.snapshot(node)
    for run in runs:
        run["running"] = None if running is None else run["prompt_id"] in running
    return {"runs": runs, "smoothing": STORE.smoothing, "max_points": STORE.max_points}


_registered: set[int] = set()


def register_routes(server: Any = None) -> bool:
    """Add ``GET HISTORY_ROUTE`` (``?node=<id>`` for one node) to the server's routes, once per
    server; ComfyUI also serves it under ``/api``. False when there is no server. Called when this
    module is imported, i.e. while ComfyUI loads the pack, before it hands its routes to aiohttp."""
    server = server if server is not None else prompt_server()
    routes = getattr(server, "routes", None)
    if routes is None or id(server) in _registered:
        return id(server) in _registered
    from aiohttp import web

    @routes.get(HISTORY_ROUTE)
    async def training_history(request: web.Request) -> web.Response:
        return web.json_response(history_answer(server, request.query.get("node") or None))

    _registered.add(id(server))
    return True


register_routes()
