"""The front-end side of the pack, checked without ComfyUI: web/diff2flow.js (the live training
progress on Train Diff2Flow LoRA), web/diff2flow_sampling.js (the steps and cfg Diff2Flow KSampler
used) and the help pages in web/docs.

The Python sources are read with ``ast``, never imported (they need ComfyUI). The JavaScript
tests need ``node`` and are skipped with that reason without it.
"""

from __future__ import annotations

import ast
import json
import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
WEB = ROOT / "web"
EXTENSION = WEB / "diff2flow.js"
CHART = WEB / "loss_chart.js"
SAMPLING_EXTENSION = WEB / "diff2flow_sampling.js"
DOCS = WEB / "docs"
PROGRESS = ROOT / "nodes" / "progress.py"  # PROGRESS_EVENT, VALIDATION_EVENT, HISTORY_ROUTE: what the server sends
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(
    NODE is None, reason="node (Node.js) is not on PATH: cannot parse or run web/diff2flow.js"
)

# events the ComfyUI frontend itself emits; anything else the extension listens to is ours
FRONTEND_EVENTS = {
    "status",
    "executing",
    "executed",
    "progress",
    "progress_state",
    "execution_start",
    "execution_success",
    "execution_error",
    "execution_interrupted",
    "execution_cached",
    "b_preview",
    "graphChanged",
    "promptQueued",
    "logs",
    "notification",
    "reconnecting",
    "reconnected",
}


def module_constant(path: pathlib.Path, name: str) -> str:
    """The string a module-level ``NAME = "..."`` assigns, read with ast."""
    for node in ast.parse(path.read_text()).body:
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            assert isinstance(node.value, ast.Constant) and isinstance(node.value.value, str), (
                f"{name} is not a string literal"
            )
            return node.value.value
    raise AssertionError(f"{path.name} defines no {name}")


def registered_nodes() -> dict[str, list[str]]:
    """node_id -> input names of every ``io.Schema(node_id="D2F_...", inputs=[...])`` in nodes/*.py."""
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "nodes").glob("*.py")):
        for call in ast.walk(ast.parse(path.read_text())):
            if not isinstance(call, ast.Call):
                continue
            kw = {k.arg: k.value for k in call.keywords}
            node_id = kw.get("node_id")
            if not (
                isinstance(node_id, ast.Constant)
                and isinstance(node_id.value, str)
                and node_id.value.startswith("D2F_")
            ):
                continue
            inputs = kw.get("inputs")
            elements = inputs.elts if isinstance(inputs, (ast.List, ast.Tuple)) else []
            names = [
                e.args[0].value
                for e in elements
                if isinstance(e, ast.Call) and e.args and isinstance(e.args[0], ast.Constant)
            ]
            assert node_id.value not in found, f"node id {node_id.value} registered twice"
            found[node_id.value] = names
    return found


def js_listened_events(source: str) -> set[str]:
    """Event names passed to ``addEventListener``, as literals or through ``const NAME = "..."``."""
    constants = dict(re.findall(r"""\bconst\s+([A-Za-z_$][\w$]*)\s*=\s*["']([^"']*)["']""", source))
    events = set()
    for arg in re.findall(r"""addEventListener\(\s*([^,)]+?)\s*,""", source):
        literal = re.fullmatch(r"""["']([^"']*)["']""", arg)
        events.add(literal.group(1) if literal else constants.get(arg, f"<unresolved {arg}>"))
    return events


# ---------------------------------------------------------------------------------------------
# web/diff2flow.js


@needs_node
def test_extension_parses_as_an_es_module() -> None:
    for path in (EXTENSION, CHART):
        result = subprocess.run(
            [NODE, "--input-type=module", "--check"], input=path.read_text(), capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, f"{path.name}: {result.stderr}"


def server_events() -> set[str]:
    """The events nodes/progress.py sends: the loss of each step, the validation loss."""
    return {module_constant(PROGRESS, "PROGRESS_EVENT"), module_constant(PROGRESS, "VALIDATION_EVENT")}


def test_extension_listens_to_the_progress_events_the_training_node_sends() -> None:
    events = server_events()
    source = EXTENSION.read_text()
    own = js_listened_events(source) - FRONTEND_EVENTS
    assert own == events, f"web/diff2flow.js listens to {sorted(own)}, nodes/progress.py sends {sorted(events)}"
    assert 'from "../../scripts/app.js"' in source and 'from "../../scripts/api.js"' in source
    assert f'"{module_constant(PROGRESS, "HISTORY_ROUTE")}"' in source, (
        "the page asks another route than the server serves"
    )
    assert "scripts/" not in CHART.read_text(), "loss_chart.js draws only: it imports nothing from the front-end"


MOCK_APP = """
const nodes = [{ id: 7, type: "D2F_TrainLoRA", size: [360, 650], flags: {} }, { id: 3, type: "KSampler", size: [300, 200] },
               { id: 9, type: "D2F_TrainLoRA", size: [500, 650], flags: {} }];
export const app = {
  graph: { _nodes: nodes, getNodeById: (id) => nodes.find((n) => String(n.id) === String(id)), setDirtyCanvas() {} },
  registerExtension(ext) { globalThis.__extensions = [...(globalThis.__extensions || []), ext]; },
};
"""
MOCK_API = """
class Api extends EventTarget {
  constructor() { super(); this.listened = []; }
  addEventListener(type, ...rest) { this.listened.push(type); return super.addEventListener(type, ...rest); }
}
export const api = new Api();
// the server's history route: one unfinished run of node 9 (two buckets of 20 steps, validations at steps 0 and 20)
api.fetched = [];
api.fetchApi = async (url) => {
  api.fetched.push(url);
  const runs = globalThis.__historyRuns ?? [{ node: "9", prompt_id: "p9", workflow: null, step: 40, steps: 50, loss: 0.3,
                  lr: 1e-4, smooth: 0.31, eta_s: 5, elapsed_s: 20, finished: false, running: true, stride: 1,
                  points: [[1, 20, 0.2, 0.9, 0.4, 0.4], [21, 40, 0.1, 0.5, 0.3, 0.31]],
                  validation: [[0, 1.25], [20, 0.45]], val_loss: 0.45 }];
  return { ok: true, json: async () => ({ runs }) };
};
"""
DRIVER = """
import { app } from "./scripts/app.js";
import { api } from "./scripts/api.js";
await import("./extensions/diff2flow/diff2flow.js");
const [ext] = globalThis.__extensions;
const intervals = [];  // the extension's timers (its history poll), called by hand below
globalThis.setInterval = (fn) => (intervals.push(fn), { unref() {} });
const realNow = Date.now;
let clockShift = 0;
Date.now = () => realNow() + clockShift;
await ext.setup?.(app);
class TrainNode {}
class OtherNode {}
await ext.beforeRegisterNodeDef(TrainNode, { name: "D2F_TrainLoRA" }, app);
await ext.beforeRegisterNodeDef(OtherNode, { name: "KSampler" }, app);
const texts = [];
const ctx = new Proxy({}, {
  get: (t, k) => (k in t ? t[k] : (...args) => { if (k === "fillText") texts.push(args[0]); }),
  set: (t, k, v) => ((t[k] = v), true),
});
const node = Object.assign(new TrainNode(), app.graph._nodes[0]);
app.graph._nodes[0] = node;
const send = (detail) => api.dispatchEvent(new CustomEvent(EVENT, detail === undefined ? {} : { detail }));
const sendVal = (detail) => api.dispatchEvent(new CustomEvent(VALIDATION_EVENT, detail === undefined ? {} : { detail }));
node.onDrawForeground(ctx);  // before any event: draws nothing
const before = texts.length;
api.dispatchEvent(new CustomEvent("executing", { detail: "7" }));
send({ step: 1, steps: 10, loss: 0.5, lr: 0.0001 });
send({});                      // fields missing
send(undefined);               // no detail at all
send({ step: "x", loss: null, lr: NaN });
send({ step: 3, steps: 10, loss: 0.25, lr: 0.0001 });
node.onDrawForeground(ctx);
node.onDrawForeground(null);   // no context: must not throw
api.dispatchEvent(new CustomEvent("executing", { detail: null }));
const node9 = Object.assign(new TrainNode(), app.graph._nodes[2]);
app.graph._nodes[2] = node9;
node9.onDrawForeground(ctx);
const fromHistory = node9.diff2flowChart;
send({ node: "9", prompt_id: "p9", step: 41, steps: 50, loss: 2.5, lr: 1e-4, smooth: 0.4, eta_s: 4, elapsed_s: 21 });
send({ node: "9", prompt_id: "p9", step: 41, steps: 50, loss: 9.0, lr: 1e-4 });  // a repeated step: ignored
send({ node: "12", prompt_id: "p9", step: 1, steps: 5, loss: 1.0, lr: 1e-4 });  // another node's run
node9.onDrawForeground(ctx);
const live = node9.diff2flowChart;
sendVal({ node: "9", prompt_id: "p9", step: 40, steps: 50, val_loss: 0.05 });  // below every training loss
sendVal({ node: "9", prompt_id: "p9", step: 41, steps: 50, val_loss: NaN });   // not drawable: ignored
sendVal({});                                                                    // fields missing
sendVal(undefined);                                                             // no detail at all
node9.onDrawForeground(ctx);
const liveVal = node9.diff2flowChart;
// the history asked again (a node created): the live validation it does not have yet stays
const fetches = api.fetched.length;
ext.nodeCreated(node9);
await new Promise((resolve) => setTimeout(resolve, 20));
node9.onDrawForeground(ctx);
const reloaded = { ...node9.diff2flowChart, fetches: api.fetched.length - fetches };
// the next run of node 9: its validation at step 0 comes first, then its steps continue that run
sendVal({ node: "9", prompt_id: "q9", workflow: null, step: 0, steps: 8, val_loss: 0.7 });
node9.onDrawForeground(ctx);
const valFirst = node9.diff2flowChart;
send({ node: "9", prompt_id: "q9", step: 1, steps: 8, loss: 0.6, lr: 1e-4, smooth: 0.6 });
send({ node: "9", prompt_id: "q9", step: 2, steps: 8, loss: 0.5, lr: 1e-4, smooth: 0.55 });
node9.onDrawForeground(ctx);
const stepsAfter = node9.diff2flowChart;
// without a node (outside ComfyUI's executing context): the executing training node's run, a step-0 one a new run
api.dispatchEvent(new CustomEvent("executing", { detail: "7" }));
sendVal({ step: 3, steps: 10, val_loss: 0.3 });
node.onDrawForeground(ctx);
const noNode = node.diff2flowChart;
sendVal({ step: 0, steps: 10, val_loss: 0.9 });
node.onDrawForeground(ctx);
const noNodeNext = node.diff2flowChart;
// a finished run whose prompt still executes, its last validation not yet in: the history is asked again after a
// while without live events (a dropped socket), until it has that validation
const settle = () => new Promise((resolve) => setTimeout(resolve, 20));
const finishedRun = (validation) => ({ node: "9", prompt_id: "r9", workflow: null, step: 10, steps: 10, loss: 0.2,
  lr: 1e-4, smooth: 0.2, finished: true, running: true, stride: 1, points: [[1, 10, 0.2, 0.4, 0.2, 0.2]], validation });
api.dispatchEvent(new CustomEvent("execution_interrupted", {}));  // the driver's other runs: stopped, not polled
globalThis.__historyRuns = [finishedRun([[0, 0.5], [5, 0.3]])];
ext.nodeCreated(node9);
await settle();
globalThis.__historyRuns = [finishedRun([[0, 0.5], [5, 0.3], [10, 0.25]])];  // what the server has by now
const polls = [];
for (let i = 0; i < 2; i++) {
  const count = api.fetched.length;
  clockShift += 6000;
  for (const fn of intervals) fn();
  await settle();
  polls.push(api.fetched.length - count);
}
node9.onDrawForeground(ctx);
const polled = { ...node9.diff2flowChart, polls, intervals: intervals.length };
console.log(JSON.stringify({ name: ext.name, listened: api.listened, before, texts, fetched: api.fetched,
  fromHistory, live, liveVal, reloaded, valFirst, stepsAfter, noNode, noNodeNext, polled,
  otherPatched: OtherNode.prototype.onDrawForeground !== undefined }));
"""


def in_plot(dot: list[float], plot: list[float]) -> bool:
    x, y, w, h = plot
    return x - 0.5 <= dot[0] <= x + w + 0.5 and y - 0.5 <= dot[1] <= y + h + 0.5


def run_extension_driver(tmp_path) -> dict:
    """web/diff2flow.js against the mocked front-end (MOCK_APP, MOCK_API) driven by DRIVER: what it drew."""
    event = module_constant(PROGRESS, "PROGRESS_EVENT")
    validation_event = module_constant(PROGRESS, "VALIDATION_EVENT")
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "app.js").write_text(MOCK_APP)
    (tmp_path / "scripts" / "api.js").write_text(MOCK_API)
    ext_dir = tmp_path / "extensions" / "diff2flow"  # where ComfyUI serves WEB_DIRECTORY: ../../scripts resolves
    ext_dir.mkdir(parents=True)
    shutil.copy(EXTENSION, ext_dir / "diff2flow.js")
    shutil.copy(CHART, ext_dir / "loss_chart.js")
    constants = f"const EVENT = {json.dumps(event)};\nconst VALIDATION_EVENT = {json.dumps(validation_event)};\n"
    (tmp_path / "driver.mjs").write_text(constants + DRIVER)
    result = subprocess.run(
        [NODE, str(tmp_path / "driver.mjs")], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@needs_node
def test_extension_draws_progress_on_the_training_node_against_a_mocked_frontend(tmp_path) -> None:
    out = run_extension_driver(tmp_path)
    assert out["name"] == "diff2flow.training"
    assert set(out["listened"]) - FRONTEND_EVENTS == server_events()
    assert out["before"] == 0
    assert any(t.startswith("step 3/10") and "loss 0.2500" in t for t in out["texts"]), out["texts"]
    assert not out["otherPatched"], "only D2F_TrainLoRA nodes get the progress display"
    # the history asked for at setup is on node 9; a live step of its run is appended, a repeated one ignored
    assert out["fetched"] and all(url == module_constant(PROGRESS, "HISTORY_ROUTE") for url in out["fetched"])
    assert (out["fromHistory"]["points"], out["fromHistory"]["lastStep"], out["fromHistory"]["firstStep"]) == (2, 40, 1)
    assert out["fromHistory"]["header"][0].startswith("step 40/50  loss 0.3000"), out["fromHistory"]["header"]
    assert "ETA 0:05" in out["fromHistory"]["header"][1], out["fromHistory"]["header"]
    live = out["live"]
    assert (live["points"], live["lastStep"], live["lastLoss"]) == (3, 41, 2.5), live
    assert live["yLabels"] and live["xLabels"], live
    # the chart is as wide as the node (500) and above it
    assert live["box"][0] == 0 and live["box"][2] == 500 and live["box"][1] + live["box"][3] < 0, live["box"]


@needs_node
def test_extension_draws_the_validation_losses_live_and_from_the_history(tmp_path) -> None:
    out = run_extension_driver(tmp_path)
    # the history's validation losses: a second series, the last one in the header, on the chart's y scale
    history = out["fromHistory"]
    assert (history["validation"], history["valLoss"]) == (2, 0.45), history
    assert "val 0.4500" in history["header"][1], history["header"]
    assert history["yRange"][1] >= 1.25 and history["xRange"][0] == 0, history  # above every step; step 0 shown
    assert len(history["valDots"]) == 2 and all(in_plot(d, history["plot"]) for d in history["valDots"]), history
    assert "val" not in out["live"]["header"][0]
    # a live validation event adds a point (a non-finite or empty one nothing); the y scale reaches down to it
    live = out["liveVal"]
    assert (live["validation"], live["valLoss"], live["points"]) == (3, 0.05, 3), live
    assert "val 0.0500" in live["header"][1] and live["yRange"][0] <= 0.05, live
    assert all(in_plot(d, live["plot"]) for d in live["valDots"]), live
    assert [d[0] for d in live["valDots"]] == sorted(d[0] for d in live["valDots"]), live["valDots"]
    # the history asked again has validations up to step 20 only: the live one at step 40 stays
    reloaded = out["reloaded"]
    assert reloaded["fetches"] == 1 and (reloaded["validation"], reloaded["valLoss"]) == (3, 0.05), reloaded
    assert (reloaded["points"], reloaded["lastStep"]) == (3, 41), reloaded
    # the next run: its validation at step 0 draws the chart before any step, its steps continue that run
    first = out["valFirst"]
    assert (first["validation"], first["points"], first["lastStep"], first["steps"]) == (1, 0, None, 8), first
    assert first["valDots"] and "val 0.7000" in first["header"][1], first
    after = out["stepsAfter"]
    assert (after["validation"], after["points"], after["firstStep"], after["lastStep"]) == (1, 2, 1, 2), after
    assert after["xRange"] == [0, 2] and after["header"][0].startswith("step 2/8  loss 0.5000"), after
    # without a node: the executing training node's run (step 3 of it), then a validation at step 0 starts a new one
    assert (out["noNode"]["validation"], out["noNode"]["points"], out["noNode"]["lastStep"]) == (1, 2, 3), out
    assert (out["noNodeNext"]["validation"], out["noNodeNext"]["points"]) == (1, 0), out["noNodeNext"]
    assert "val 0.9000" in out["noNodeNext"]["header"][1], out["noNodeNext"]["header"]
    # a finished run whose prompt still executes is polled until its last validation (step 10) is in, then not
    polled = out["polled"]
    assert polled["intervals"] == 1 and polled["polls"] == [1, 0], polled
    assert (polled["validation"], polled["valLoss"], polled["finished"]) == (3, 0.25, True), polled


# ---------------------------------------------------------------------------------------------
# web/diff2flow_sampling.js

SAMPLING_DRIVER = """
import { app } from "./scripts/app.js";
await import("./extensions/diff2flow/diff2flow_sampling.js");
const [ext] = globalThis.__extensions;
class KSamplerNode { onExecuted(output) { this.ownHandlerSaw = output; } }
class OtherNode {}
await ext.beforeRegisterNodeDef(KSamplerNode, { name: "D2F_KSampler" }, app);
await ext.beforeRegisterNodeDef(OtherNode, { name: "KSampler" }, app);
const texts = [];
const ctx = new Proxy({}, {
  get: (t, k) => (k in t ? t[k] : (...args) => { if (k === "fillText") texts.push(args[0]); }),
  set: (t, k, v) => ((t[k] = v), true),
});
const node = Object.assign(new KSamplerNode(), { id: 5, size: [300, 260], flags: {} });
node.onDrawForeground(ctx);            // before a run: draws nothing
const before = texts.length;
node.onExecuted(undefined);            // no output at all
node.onExecuted({ images: [] });       // no text
node.onDrawForeground(ctx);
const afterEmpty = texts.length;
node.onExecuted({ text: [USED] });
node.onDrawForeground(ctx);
node.onDrawForeground(null);           // no context: must not throw
console.log(JSON.stringify({ name: ext.name, before, afterEmpty, texts, ownHandler: node.ownHandlerSaw?.text?.[0] ?? null,
  otherPatched: OtherNode.prototype.onDrawForeground !== undefined || OtherNode.prototype.onExecuted !== undefined }));
"""


@needs_node
def test_sampling_extension_parses_as_an_es_module() -> None:
    result = subprocess.run(
        [NODE, "--input-type=module", "--check"],
        input=SAMPLING_EXTENSION.read_text(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


@needs_node
def test_sampling_extension_shows_the_steps_and_cfg_the_ksampler_used(tmp_path) -> None:
    used = "euler, 2 steps, cfg 1: recommended by LoRA 'r.safetensors' (objective reflow)"
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "app.js").write_text(MOCK_APP)
    ext_dir = tmp_path / "extensions" / "diff2flow"
    ext_dir.mkdir(parents=True)
    shutil.copy(SAMPLING_EXTENSION, ext_dir / "diff2flow_sampling.js")
    (tmp_path / "driver.mjs").write_text(f"const USED = {json.dumps(used)};\n" + SAMPLING_DRIVER)
    result = subprocess.run(
        [NODE, str(tmp_path / "driver.mjs")], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["name"] == "diff2flow.sampling"
    assert out["before"] == 0 and out["afterEmpty"] == 0, out["texts"]
    assert out["texts"] == [used], out["texts"]
    assert out["ownHandler"] == used, "the node's own onExecuted must still run"
    assert not out["otherPatched"], "only D2F_KSampler nodes get the display"


def test_sampling_extension_reads_the_text_the_ksampler_returns() -> None:
    """The node returns ``ui={"text": [...]}`` (what the extension reads as ``output.text[0]``)."""
    source = (ROOT / "nodes" / "sampling_nodes.py").read_text()
    assert 'ui={"text": [' in source
    assert "output.text[0]" in SAMPLING_EXTENSION.read_text()
    assert 'NODE_TYPE = "D2F_KSampler"' in SAMPLING_EXTENSION.read_text()


# ---------------------------------------------------------------------------------------------
# help pages


def help_page(node_id: str, locale: str = "en") -> pathlib.Path:
    """Where the front-end looks first: ``<WEB_DIRECTORY>/docs/<node id>/<locale>.md`` (frontend 1.35
    falls back to ``docs/<node id>.md`` only after a 404)."""
    return DOCS / node_id / f"{locale}.md"


def test_help_pages_use_the_per_locale_layout_only() -> None:
    """One copy per page: no ``docs/<id>.md`` beside ``docs/<id>/en.md``, nothing else in docs/."""
    nodes = registered_nodes()
    stray = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*") if p.is_file() and p.parent.name not in nodes)
    assert not stray, f"files in web/docs outside web/docs/<node id>/: {stray}"
    unknown = sorted(p.name for p in DOCS.iterdir() if p.is_dir() and p.name not in nodes)
    assert not unknown, f"help pages for nodes that are not registered: {unknown}"


def test_every_registered_node_has_a_help_page() -> None:
    nodes = registered_nodes()
    assert {"D2F_TrainLoRA", "D2F_SaveLoRA", "D2F_KSampler"} <= set(nodes), sorted(nodes)
    missing = [node_id for node_id in nodes if not help_page(node_id).is_file()]
    assert not missing, f"no help page web/docs/<id>/en.md for {missing}"


def test_help_pages_describe_every_input() -> None:
    undocumented = {}
    for node_id, inputs in registered_nodes().items():
        page = help_page(node_id)
        if page.is_file():
            text = page.read_text()
            undocumented.update(
                {f"{node_id}.{name}": str(page.relative_to(DOCS)) for name in inputs if f"`{name}`" not in text}
            )
    assert not undocumented, f"inputs not mentioned (as `name`) in their help page: {sorted(undocumented)}"


CHART_DRIVER = """
import { appendStep, columns, drawChart, newRun, niceTicks } from "./loss_chart.js";
const run = newRun({ node: "1", prompt_id: "p" });
const losses = [];
for (let s = 1; s <= 3000; s++) {
  const loss = s === 1234 ? 50 : s === 2222 ? -7 : 0.2 + 0.01 * Math.sin(s);
  losses.push(loss);
  appendStep(run, { step: s, steps: 3000, loss, lr: 1e-4, smooth: 0.2 }, 256);
}
const cols = columns(run.points, 40);
// each column spans whole steps s0..s1: its range must be exactly the range of those steps' losses
const exact = cols.every((c, i) => c.hi === Math.max(...losses.slice(c.s0 - 1, c.s1)) &&
  c.lo === Math.min(...losses.slice(c.s0 - 1, c.s1)) && (i === 0 || c.s0 === cols[i - 1].s1 + 1));
const ctx = new Proxy({}, { get: (t, k) => (k in t ? t[k] : () => {}), set: (t, k, v) => ((t[k] = v), true) });
const small = drawChart(ctx, run, [0, -200, 300, 150]), wide = drawChart(ctx, run, [0, -300, 900, 280]);
console.log(JSON.stringify({ points: run.points.length, stride: run.stride, first: run.points[0][0],
  last: run.points[run.points.length - 1][1], cols: cols.length, hi: Math.max(...cols.map((c) => c.hi)),
  lo: Math.min(...cols.map((c) => c.lo)), exact, ticks: niceTicks(0.13, 0.92, 4), steps: niceTicks(1, 3000, 5, true),
  small, wide }));
"""


@needs_node
def test_chart_downsamples_to_its_width_and_keeps_spikes(tmp_path) -> None:
    shutil.copy(CHART, tmp_path / "loss_chart.js")
    (tmp_path / "driver.mjs").write_text(CHART_DRIVER)
    result = subprocess.run(
        [NODE, str(tmp_path / "driver.mjs")], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["points"] <= 256 and out["stride"] > 1 and (out["first"], out["last"]) == (1, 3000), out
    assert out["cols"] <= 40 and (out["hi"], out["lo"]) == (50, -7), out  # the spike and the dip survive both merges
    assert out["exact"], "a column's range is not the range of the losses of its steps"
    assert out["ticks"] == [0.2, 0.4, 0.6, 0.8] and out["steps"] == [1000, 2000, 3000], out
    small, wide = out["small"], out["wide"]
    assert small["columns"] <= 300 - 62 and wide["columns"] > small["columns"], (small["columns"], wide["columns"])
    assert wide["plot"][2] > small["plot"][2] and wide["plot"][3] > small["plot"][3]  # the plot grows with its box
    assert small["yLabels"] and small["xLabels"][-1] == "3000", small
    assert small["header"][1].startswith("smoothed 0.2000  done in"), small["header"]


VALIDATION_CHART_DRIVER = """
import { COLORS, appendStep, appendValidation, drawChart, newRun } from "./loss_chart.js";
// a recording canvas: the style of every stroke and fill, the centre of every dot
const calls = [];
const ctx = new Proxy({}, {
  get: (t, k) => (k in t ? t[k] : (...args) => {
    if (k === "stroke" || k === "fill") calls.push({ op: k, style: k === "stroke" ? t.strokeStyle : t.fillStyle });
    if (k === "arc") calls.push({ op: "arc", at: [args[0], args[1]], style: t.fillStyle });
  }),
  set: (t, k, v) => ((t[k] = v), true),
});
const run = newRun({ node: "1", prompt_id: "p" });
for (let s = 1; s <= 10; s++) appendStep(run, { step: s, steps: 10, loss: 0.2 + 0.01 * (s % 3), lr: 1e-4, smooth: 0.21 });
const noVal = drawChart(ctx, run, [0, -300, 600, 250]);
calls.length = 0;
appendValidation(run, { step: 10, steps: 10, val_loss: 0.15 });
appendValidation(run, { step: 0, steps: 10, val_loss: 0.9 });   // out of order: sorted in
appendValidation(run, { step: 5, steps: 10, val_loss: 0.5 });
appendValidation(run, { step: 5, steps: 10, val_loss: 0.05 });  // the same step again: replaced
appendValidation(run, { step: 7, steps: 10, val_loss: Infinity });  // not drawable: ignored
const drawn = drawChart(ctx, run, [0, -300, 600, 250]);
const drawnCalls = calls.slice();
const only = newRun({ node: "2", prompt_id: "q" });
appendValidation(only, { step: 0, steps: 4, val_loss: 0.3 });
const alone = drawChart(ctx, only, [0, -300, 600, 250]);
console.log(JSON.stringify({ colors: COLORS, validation: run.validation, valLoss: run.val_loss, noVal, drawn, calls: drawnCalls,
  alone, only: { steps: only.steps, validation: only.validation } }));
"""


@needs_node
def test_chart_draws_the_validation_series_on_the_loss_scale(tmp_path) -> None:
    shutil.copy(CHART, tmp_path / "loss_chart.js")
    (tmp_path / "driver.mjs").write_text(VALIDATION_CHART_DRIVER)
    result = subprocess.run(
        [NODE, str(tmp_path / "driver.mjs")], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["validation"] == [[0, 0.9], [5, 0.05], [10, 0.15]] and out["valLoss"] == 0.15, out["validation"]
    no_val, drawn = out["noVal"], out["drawn"]
    assert no_val["validation"] == 0 and no_val["valDots"] == [] and "val" not in no_val["header"][1], no_val
    assert no_val["xRange"][0] == 1 and no_val["yRange"][1] < 0.9, no_val  # the training losses only
    # the validation losses widen the y scale both ways and the x scale to step 0
    lo, hi = drawn["yRange"]
    assert lo < 0.05 and hi > 0.9 and drawn["xRange"] == [0, 10], drawn
    assert drawn["header"][1].startswith("smoothed 0.2100  val 0.1500  done in"), drawn["header"]
    x, y, w, h = drawn["plot"]
    dots = drawn["valDots"]
    assert len(dots) == 3 and all(x - 0.5 <= d[0] <= x + w + 0.5 and y - 0.5 <= d[1] <= y + h + 0.5 for d in dots)
    assert dots[0][0] == pytest.approx(x) and dots[-1][0] == pytest.approx(x + w), dots  # step 0 and step 10
    assert dots[1][1] > dots[2][1] > dots[0][1], dots  # 0.05 lowest on the screen, 0.9 highest
    # a distinct colour, a line and a dot per point, drawn over the training curves
    color = out["colors"]["validation"]
    assert color not in {v for k, v in out["colors"].items() if k != "validation"}, out["colors"]
    calls = out["calls"]
    arcs = [c for c in calls if c["op"] == "arc"]
    assert [c["at"] for c in arcs] == dots and all(c["style"] == color for c in arcs), arcs
    val_strokes = [i for i, c in enumerate(calls) if c["op"] == "stroke" and c["style"] == color]
    smooth_strokes = [i for i, c in enumerate(calls) if c["op"] == "stroke" and c["style"] == out["colors"]["smooth"]]
    assert len(val_strokes) == 1 and smooth_strokes and val_strokes[0] > max(smooth_strokes), calls
    assert sum(1 for c in calls if c["op"] == "fill" and c["style"] == color) == 3, calls
    # a run with its validation at step 0 only (before the first step) already has a chart
    alone = out["alone"]
    assert out["only"] == {"steps": 4, "validation": [[0, 0.3]]} and alone["validation"] == 1, out["only"]
    assert len(alone["valDots"]) == 1 and alone["yLabels"] and alone["xRange"] == [0, 1], alone
