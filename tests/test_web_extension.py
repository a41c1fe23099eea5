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
PROGRESS = ROOT / "nodes" / "progress.py"  # PROGRESS_EVENT and HISTORY_ROUTE, what report_progress sends
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


def test_extension_listens_to_the_progress_event_the_training_node_sends() -> None:
    event = module_constant(PROGRESS, "PROGRESS_EVENT")
    source = EXTENSION.read_text()
    own = js_listened_events(source) - FRONTEND_EVENTS
    assert own == {event}, f"web/diff2flow.js listens to {sorted(own)}, nodes/train_nodes.py sends {event!r}"
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
// the server's history route: one unfinished run of node 9 (two buckets of 20 steps)
api.fetched = [];
api.fetchApi = async (url) => {
  api.fetched.push(url);
  const runs = [{ node: "9", prompt_id: "p9", workflow: null, step: 40, steps: 50, loss: 0.3, lr: 1e-4, smooth: 0.31,
                  eta_s: 5, elapsed_s: 20, finished: false, running: true, stride: 1,
                  points: [[1, 20, 0.2, 0.9, 0.4, 0.4], [21, 40, 0.1, 0.5, 0.3, 0.31]] }];
  return { ok: true, json: async () => ({ runs }) };
};
"""
DRIVER = """
import { app } from "./scripts/app.js";
import { api } from "./scripts/api.js";
await import("./extensions/diff2flow/diff2flow.js");
const [ext] = globalThis.__extensions;
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
console.log(JSON.stringify({ name: ext.name, listened: api.listened, before, texts, fetched: api.fetched,
  fromHistory, live: node9.diff2flowChart, otherPatched: OtherNode.prototype.onDrawForeground !== undefined }));
"""


@needs_node
def test_extension_draws_progress_on_the_training_node_against_a_mocked_frontend(tmp_path) -> None:
    event = module_constant(PROGRESS, "PROGRESS_EVENT")
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "app.js").write_text(MOCK_APP)
    (tmp_path / "scripts" / "api.js").write_text(MOCK_API)
    ext_dir = tmp_path / "extensions" / "diff2flow"  # where ComfyUI serves WEB_DIRECTORY: ../../scripts resolves
    ext_dir.mkdir(parents=True)
    shutil.copy(EXTENSION, ext_dir / "diff2flow.js")
    shutil.copy(CHART, ext_dir / "loss_chart.js")
    (tmp_path / "driver.mjs").write_text(f"const EVENT = {json.dumps(event)};\n" + DRIVER)
    result = subprocess.run(
        [NODE, str(tmp_path / "driver.mjs")], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["name"] == "diff2flow.training"
    assert set(out["listened"]) - FRONTEND_EVENTS == {event}
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
