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
SAMPLING_EXTENSION = WEB / "diff2flow_sampling.js"
DOCS = WEB / "docs"
TRAIN_NODES = ROOT / "nodes" / "train_nodes.py"
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="node (Node.js) is not on PATH: cannot parse or run web/diff2flow.js")

# events the ComfyUI frontend itself emits; anything else the extension listens to is ours
FRONTEND_EVENTS = {
    "status", "executing", "executed", "progress", "progress_state", "execution_start", "execution_success",
    "execution_error", "execution_interrupted", "execution_cached", "b_preview", "graphChanged", "promptQueued",
    "logs", "notification", "reconnecting", "reconnected",
}


def module_constant(path: pathlib.Path, name: str) -> str:
    """The string a module-level ``NAME = "..."`` assigns, read with ast."""
    for node in ast.parse(path.read_text()).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            assert isinstance(node.value, ast.Constant) and isinstance(node.value.value, str), f"{name} is not a string literal"
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
            if not (isinstance(node_id, ast.Constant) and isinstance(node_id.value, str) and node_id.value.startswith("D2F_")):
                continue
            inputs = kw.get("inputs")
            elements = inputs.elts if isinstance(inputs, (ast.List, ast.Tuple)) else []
            names = [e.args[0].value for e in elements if isinstance(e, ast.Call) and e.args and isinstance(e.args[0], ast.Constant)]
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
    result = subprocess.run([NODE, "--input-type=module", "--check"], input=EXTENSION.read_text(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_extension_listens_to_the_progress_event_the_training_node_sends() -> None:
    event = module_constant(TRAIN_NODES, "PROGRESS_EVENT")
    source = EXTENSION.read_text()
    own = js_listened_events(source) - FRONTEND_EVENTS
    assert own == {event}, f"web/diff2flow.js listens to {sorted(own)}, nodes/train_nodes.py sends {event!r}"
    assert 'from "../../scripts/app.js"' in source and 'from "../../scripts/api.js"' in source
    assert len(source.splitlines()) < 120


MOCK_APP = """
const nodes = [{ id: 7, type: "D2F_TrainLoRA", size: [360, 650], flags: {} }, { id: 3, type: "KSampler", size: [300, 200] }];
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
console.log(JSON.stringify({ name: ext.name, listened: api.listened, before, texts,
  otherPatched: OtherNode.prototype.onDrawForeground !== undefined }));
"""


@needs_node
def test_extension_draws_progress_on_the_training_node_against_a_mocked_frontend(tmp_path) -> None:
    event = module_constant(TRAIN_NODES, "PROGRESS_EVENT")
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "app.js").write_text(MOCK_APP)
    (tmp_path / "scripts" / "api.js").write_text(MOCK_API)
    ext_dir = tmp_path / "extensions" / "diff2flow"  # where ComfyUI serves WEB_DIRECTORY: ../../scripts resolves
    ext_dir.mkdir(parents=True)
    shutil.copy(EXTENSION, ext_dir / "diff2flow.js")
    (tmp_path / "driver.mjs").write_text(f"const EVENT = {json.dumps(event)};\n" + DRIVER)
    result = subprocess.run([NODE, str(tmp_path / "driver.mjs")], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["name"] == "diff2flow.training"
    assert set(out["listened"]) - FRONTEND_EVENTS == {event}
    assert out["before"] == 0
    assert any(t.startswith("step 3/10") and "loss 0.2500" in t for t in out["texts"]), out["texts"]
    assert not out["otherPatched"], "only D2F_TrainLoRA nodes get the progress display"


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
    result = subprocess.run([NODE, "--input-type=module", "--check"], input=SAMPLING_EXTENSION.read_text(),
                            capture_output=True, text=True, timeout=60)
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
    result = subprocess.run([NODE, str(tmp_path / "driver.mjs")], capture_output=True, text=True, timeout=60, cwd=tmp_path)
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
            undocumented.update({f"{node_id}.{name}": str(page.relative_to(DOCS)) for name in inputs if f"`{name}`" not in text})
    assert not undocumented, f"inputs not mentioned (as `name`) in their help page: {sorted(undocumented)}"
