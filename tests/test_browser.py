"""The pack in a real browser: ComfyUI's server with this repository in ``custom_nodes/`` and its
own front-end (comfyui-frontend-package) in headless Chromium.

- every example workflow loads in the page with all node types registered, and every widget holds
  the value the file intends (the front-end's own widgets, including the "control after generate"
  it adds to INT inputs named ``seed``, serialised back, and each value valid for its widget), and
  no node covers another;
- a tiny training graph queued from the page makes the loss chart of web/diff2flow.js update live on
  the Train Diff2Flow LoRA node, without covering the node's badges: every step, axes with labels,
  curves on the screen (read back as pixels), as wide as the node and resized with it;
- the chart comes back after a page reload during the run (the server's history of the steps before
  the reload, then the live steps) and after it (the finished chart stays), with the run's
  validation losses (``validation_split`` / ``validation_every``) as a second series;
- validation events draw that series in its own colour, and the "val" loss in the header, the
  validation at step 0 before the first step included;
- a node's help page opens in the front-end from ``web/docs/<node id>/en.md``;
- the Templates browser shows a thumbnail (example_workflows/<name>.jpg) for every example workflow.

Needs ComfyUI (``COMFYUI_PATH``, see comfy_harness), Playwright for Python and a Chromium binary
(``/usr/bin/chromium`` or ``CHROMIUM_PATH``); skipped with the reason otherwise. The server and the
browser are started once per session and always stopped. About 4 minutes on 2 CPU cores, most of it
writing the tiny checkpoint, starting ComfyUI and training 6 + 20 steps.
"""

from __future__ import annotations

import io
import json
import math
import re
import time
from typing import Any

import pytest
from comfy_harness import COMFYUI, COMFYUI_IMPORT_ERROR, ROOT, SKIP_REASON
from comfy_server import (
    APP_READY,
    PACK_NAME,
    ComfyServer,
    browser_missing,
    launch_chromium,
    load_workflow,
    open_app,
    write_workflow_inputs,
)

if COMFYUI is None:
    pytest.skip(COMFYUI_IMPORT_ERROR or SKIP_REASON, allow_module_level=True)
if browser_missing():
    pytest.skip(browser_missing(), allow_module_level=True)

WORKFLOWS = sorted((ROOT / "example_workflows").glob("*.json"))
DOCS = ROOT / "web" / "docs"
TRAIN_STEPS = 6
THUMBNAIL_MAX_BYTES = 60_000
WAIT_TRAINING_S = 150  # checkpoint load + CLIP + 6 steps: ~20 s on 2 cores


# ---------------------------------------------------------------------------------------------
# what the page runs


# Records what web/diff2flow.js draws on the real canvas: the progress texts ("step s/N  loss ..."),
# the rectangle filled just before each (the box behind the text), and where the watched badge
# texts are drawn above the node, all in canvas pixels.
INIT_SCRIPT = """
window.__d2f = { progress: [], box: null, text: null, badges: {}, watch: [], events: [], valEvents: [], done: [] };
(() => {
  const toCanvas = (ctx, x0, y0, x1, y1) => {
    const m = ctx.getTransform();
    const a = m.transformPoint(new DOMPoint(x0, y0)), b = m.transformPoint(new DOMPoint(x1, y1));
    return [Math.min(a.x, b.x), Math.min(a.y, b.y), Math.max(a.x, b.x), Math.max(a.y, b.y)];
  };
  let lastFill = null;
  const fillRect = CanvasRenderingContext2D.prototype.fillRect;
  CanvasRenderingContext2D.prototype.fillRect = function (x, y, w, h) {
    lastFill = [this, x, y, w, h];
    return fillRect.apply(this, arguments);
  };
  const fillText = CanvasRenderingContext2D.prototype.fillText;
  CanvasRenderingContext2D.prototype.fillText = function (text, x, y) {
    const s = window.__d2f;
    if (typeof text === "string" && text.startsWith("step ")) {
      if (s.progress[s.progress.length - 1] !== text) s.progress.push(text);
      if (lastFill && lastFill[0] === this) s.box = toCanvas(this, lastFill[1], lastFill[2], lastFill[1] + lastFill[3], lastFill[2] + lastFill[4]);
      s.text = toCanvas(this, x, y, x + this.measureText(text).width, y + 12);
    } else if (s.watch.includes(text) && y < 0) {
      // a badge: drawn above the node's body (y < 0 in node coordinates; a combo widget may show the same text)
      const h = 12;  // badge text: 12 px, baseline "middle"
      s.badges[text] = toCanvas(this, x, y - h / 2, x + this.measureText(text).width, y + h / 2);
    }
    return fillText.apply(this, arguments);
  };
})();
"""

# Every node of the loaded graph: is its type registered, where it is drawn (title bar included), its
# widgets (name, type, value, limits, options) and the widgets_values the front-end would save.
READ_GRAPH = """() => window.app.graph._nodes.map((n) => ({
  id: n.id, type: n.type, registered: !!window.LiteGraph.registered_node_types[n.type],
  box: [n.pos[0], n.pos[1] - window.LiteGraph.NODE_TITLE_HEIGHT, n.pos[0] + n.size[0], n.pos[1] + n.size[1]],
  saved: n.serialize().widgets_values ?? null,
  widgets: (n.widgets || []).map((w) => {
    let values = w.options?.values;
    if (typeof values === "function") values = values(w, n);
    return { name: w.name, type: w.type, value: w.value === undefined ? "<undefined>" : w.value,
             min: w.options?.min ?? null, max: w.options?.max ?? null, values: Array.isArray(values) ? values : null };
  }),
}))"""

# A tiny training graph built with the front-end's own node classes, widgets set by input name:
# Load Checkpoint -> CLIP Text Encode / Empty Latent (64 px) -> Train Diff2Flow LoRA -> Plot Loss Graph.
BUILD_TRAINING_GRAPH = """async ([ckpt, steps, validationEvery]) => {
  const app = window.app;
  await app.loadGraphData({ nodes: [], links: [], groups: [], config: {}, extra: {}, version: 0.4,
                            last_node_id: 0, last_link_id: 0 }, true, true, "browser-test-training");
  const add = (type, pos) => { const n = window.LiteGraph.createNode(type); n.pos = pos; app.graph.add(n); return n; };
  const set = (node, name, value) => {
    const w = node.widgets.find((w) => w.name === name);
    if (!w) throw new Error(`${node.type} has no widget ${name}`);
    w.value = value;
  };
  const wire = (src, type, dst, name) => {
    const out = src.outputs.findIndex((o) => o.type === type);
    const inp = dst.inputs.findIndex((i) => i.name === name);
    if (out < 0 || inp < 0) throw new Error(`cannot connect ${src.type} ${type} to ${dst.type}.${name}`);
    src.connect(out, dst, inp);
  };
  const loader = add("CheckpointLoaderSimple", [40, 120]);
  set(loader, "ckpt_name", ckpt);
  const text = add("CLIPTextEncode", [40, 320]);
  set(text, "text", "a photo");
  const latent = add("EmptyLatentImage", [40, 560]);
  set(latent, "width", 64); set(latent, "height", 64); set(latent, "batch_size", validationEvery ? 2 : 1);
  const train = add("D2F_TrainLoRA", [460, 420]);  // low enough for the chart above it to be on the screen
  set(train, "steps", steps); set(train, "rank", 2);
  if (validationEvery) { set(train, "validation_split", 0.5); set(train, "validation_every", validationEvery); }  // 1 of 2 held out
  const control = train.widgets.find((w) => w.name === "control_after_generate");
  if (control) control.value = "fixed";
  const plot = add("LossGraphNode", [900, 160]);
  wire(loader, "MODEL", train, "model"); wire(loader, "CLIP", text, "clip");
  wire(latent, "LATENT", train, "latents"); wire(text, "CONDITIONING", train, "positive");
  wire(train, "LOSS_MAP", plot, "loss");
  app.canvas.ds.scale = 1; app.canvas.ds.offset = [0, 0];
  app.canvas.setDirty(true, true);
  const s = window.__d2f;
  s.watch = (train.badges || []).map((b) => (typeof b === "function" ? b() : b)).filter((b) => b?.visible).map((b) => b.text);
  const { api } = await import("/scripts/api.js");
  api.addEventListener("diff2flow.train.progress", (e) => s.events.push(e.detail));
  api.addEventListener("diff2flow.train.validation", (e) => s.valEvents.push(e.detail));
  for (const type of ["execution_success", "execution_error", "execution_interrupted"])
    api.addEventListener(type, (e) => s.done.push({ type, detail: e.detail }));
  return { id: train.id, badges: s.watch };
}"""


# ---------------------------------------------------------------------------------------------
# fixtures
# Module scope, not session: Playwright's sync API keeps an asyncio loop running in the main thread
# while it is open, and the later modules' ComfyUI fixture needs asyncio.run() in that thread.


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """ComfyUI on a loopback port with this pack, the tiny SD1.5 checkpoint and the workflows' files."""
    from safetensors.torch import save_file
    from sd15_checkpoint import CKPT_NAME, tiny_sd15_state_dict

    base = tmp_path_factory.mktemp("comfyui_base")
    write_workflow_inputs(base, WORKFLOWS)
    save_file(tiny_sd15_state_dict(), str(base / "models" / "checkpoints" / CKPT_NAME))
    with ComfyServer(COMFYUI, base) as srv:
        srv.ckpt_name = CKPT_NAME
        yield srv
    assert srv.proc.poll() is not None, "the ComfyUI server is still running"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = launch_chromium(pw)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def page(server, browser):
    """One page on the server's front-end for every test; records uncaught errors and /docs/ answers."""
    pg = open_app(browser, server, init_script=INIT_SCRIPT)
    pg.set_default_timeout(30_000)
    pg.errors = []
    pg.docs_responses = []
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.on("response", lambda r: pg.docs_responses.append((r.url, r.status)) if "/docs/" in r.url else None)
    yield pg
    pg.close()


# ---------------------------------------------------------------------------------------------
# (a) the example workflows, as the front-end loads them


def overlap(a: list[float], b: list[float]) -> bool:
    """Do two [x0, y0, x1, y1] rectangles share any area?"""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def same_value(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def widget_problem(w: dict) -> str:
    """Why a widget's value cannot be what a workflow meant ('' when it is a valid value)."""
    value, kind = w["value"], w["type"]
    if kind in ("number", "slider", "knob"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"holds {value!r}, not a number"
        if (w["min"] is not None and value < w["min"]) or (w["max"] is not None and value > w["max"]):
            return f"holds {value!r}, outside [{w['min']}, {w['max']}]"
    elif kind == "combo" and w["values"] is not None and value not in w["values"]:
        return f"holds {value!r}, not one of {w['values'][:8]}"
    elif kind == "toggle" and not isinstance(value, bool):
        return f"holds {value!r}, not a boolean"
    elif kind in ("text", "customtext") and not isinstance(value, str):
        return f"holds {value!r}, not a string"
    return ""


def workflow_problems(wf: dict, graph: list[dict]) -> list[str]:
    """Everything the front-end made differently from what the workflow file says."""
    problems = []
    loaded = {n["id"]: n for n in graph}
    for node in wf["nodes"]:
        where = f"node {node['id']} ({node['type']})"
        got = loaded.get(node["id"])
        if got is None or got["type"] != node["type"]:
            problems.append(f"{where}: not in the loaded graph")
            continue
        if not got["registered"]:
            problems.append(f"{where}: node type missing in the front-end (not registered by the server)")
            continue
        values, widgets = node.get("widgets_values"), got["widgets"]
        if isinstance(values, list):
            if len(values) != len(widgets):
                problems.append(
                    f"{where}: the file has {len(values)} widgets_values, the front-end made {len(widgets)} "
                    f"widgets {[w['name'] for w in widgets]}"
                )
            if (
                got["saved"] is None
                or len(got["saved"]) != len(values)
                or not all(map(same_value, got["saved"], values))
            ):
                problems.append(f"{where}: saved back as {got['saved']}, the file has {values}")
        for w in widgets:
            why = widget_problem(w)
            if why:
                problems.append(f"{where}: widget {w['name']!r} ({w['type']}) {why}")
    for i, a in enumerate(graph):
        for b in graph[i + 1 :]:
            if overlap(a["box"], b["box"]):
                problems.append(
                    f"node {a['id']} ({a['type']}) and node {b['id']} ({b['type']}) cover each other on the canvas"
                )
    return problems


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_example_workflow_loads_with_every_widget_as_the_file_says(page, path) -> None:
    wf = json.loads(path.read_text())
    errors_before = len(page.errors)
    load_workflow(page, wf, path.stem)
    graph = page.evaluate(READ_GRAPH)
    assert sorted(n["id"] for n in graph) == sorted(n["id"] for n in wf["nodes"])
    problems = workflow_problems(wf, graph)
    assert not problems, f"{path.name} in the front-end:\n" + "\n".join(problems)
    assert page.errors[errors_before:] == [], "uncaught errors in the page while loading"


def test_workflow_check_catches_a_widget_value_that_went_astray(page) -> None:
    """A KSampler-type node with its seed's "control after generate" value removed from the file:
    every later value lands one widget early, and the check names the widgets that got them."""
    wf = json.loads((ROOT / "example_workflows" / "diff2flow_text_to_image.json").read_text())
    node = next(n for n in wf["nodes"] if n["type"] == "D2F_KSampler")
    node["widgets_values"].remove("fixed")
    load_workflow(page, wf, "browser-test-broken")
    problems = workflow_problems(wf, page.evaluate(READ_GRAPH))
    joined = "\n".join(problems)
    assert f"node {node['id']} (D2F_KSampler): the file has {len(node['widgets_values'])} widgets_values" in joined
    assert "widget 'control_after_generate' (combo) holds" in joined, joined


# ---------------------------------------------------------------------------------------------
# (b) live training progress on the node


# what web/diff2flow.js last drew on a training node (node.diff2flowChart), once it shows `steps` steps
READ_CHART = "(id) => window.app.graph?.getNodeById?.(id)?.diff2flowChart ?? null"


def wait_for_chart(page, node_id: int, last_step: int, timeout_s: float = 30, at_least: bool = False) -> dict:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(
            "([id, step, atLeast]) => { window.app.canvas.setDirty(true, true); "
            "const last = window.app.graph?.getNodeById?.(id)?.diff2flowChart?.lastStep; "
            "return atLeast ? last >= step : last === step; }",
            arg=[node_id, last_step, at_least],
            timeout=timeout_s * 1000,
            polling=250,
        )
    except PlaywrightTimeout:
        pytest.fail(
            f"the chart of node {node_id} does not reach step {last_step} within {timeout_s} s: "
            f"{page.evaluate(READ_CHART, node_id)}"
        )
    return page.evaluate(READ_CHART, node_id)


CURVE_RGB = (123, 216, 143)  # web/loss_chart.js COLORS.smooth, #7bd88f
VALIDATION_RGB = (245, 167, 66)  # web/loss_chart.js COLORS.validation, #f5a742


def curve_pixels(page, node_id: int, rgb_wanted: tuple[int, int, int] = CURVE_RGB) -> int:
    """How many pixels of the chart's plot area on the screen have the colour of its curves (#7bd88f),
    or of another series (``rgb_wanted``)."""
    from PIL import Image

    clip = page.evaluate(
        """(id) => {
      const app = window.app, n = app.graph.getNodeById(id), [x, y, w, h] = n.diff2flowChart.plot;
      const r = app.canvas.canvas.getBoundingClientRect(), ds = app.canvas.ds;
      const at = (px, py) => [(n.pos[0] + px + ds.offset[0]) * ds.scale + r.left, (n.pos[1] + py + ds.offset[1]) * ds.scale + r.top];
      const [x0, y0] = at(x, y), [x1, y1] = at(x + w, y + h);
      return { x: x0, y: y0, width: x1 - x0, height: y1 - y0 };
    }""",
        node_id,
    )
    assert clip["x"] >= 0 and clip["y"] >= 0 and clip["width"] > 20 and clip["height"] > 20, (
        f"the chart is off the screen: {clip}"
    )
    rgb = Image.open(io.BytesIO(page.screenshot(clip=clip))).convert("RGB").tobytes()
    r, g, b = rgb_wanted
    return sum(
        1
        for i in range(0, len(rgb), 3)
        if abs(rgb[i] - r) < 40 and abs(rgb[i + 1] - g) < 40 and abs(rgb[i + 2] - b) < 40
    )


# the server's events, as nodes/progress.py sends them, dispatched on the page's own api
SEND_EVENTS = """async (events) => {
  const { api } = await import("/scripts/api.js");
  for (const [type, detail] of events) api.dispatchEvent(new CustomEvent(type, { detail }));
  window.app.canvas.setDirty(true, true);
}"""


def test_validation_events_draw_a_second_series_on_the_chart(page, server) -> None:
    """The validation events of a run (nodes/progress.py VALIDATION_EVENT) in the real front-end: the one
    at step 0 comes before any step and already shows the chart, the steps continue that run, the
    series is drawn in its own colour on the loss scale and the header shows the last "val" loss.

    Before the tests that train: the server has no run yet whose history could take the node's
    chart over. A reload at the end clears the page's runs and records for them."""
    try:
        check_validation_events(page, server)
    finally:
        reload_page(page)
        page.evaluate("() => { window.__d2f.progress = []; window.__d2f.badges = {}; }")


def check_validation_events(page, server) -> None:
    train = page.evaluate(BUILD_TRAINING_GRAPH, [server.ckpt_name, 4, 0])
    node = str(train["id"])
    progress, validation = "diff2flow.train.progress", "diff2flow.train.validation"
    run = {"node": node, "prompt_id": "browser-test-validation", "workflow": None, "steps": 4}
    page.evaluate(SEND_EVENTS, [[validation, {**run, "step": 0, "val_loss": 0.9}]])
    page.wait_for_function(
        "(id) => { window.app.canvas.setDirty(true, true); "
        "return window.app.graph.getNodeById(id)?.diff2flowChart?.validation === 1; }",
        arg=train["id"],
        timeout=15_000,
    )
    first = page.evaluate(READ_CHART, train["id"])
    assert first["points"] == 0 and first["lastStep"] is None and first["valDots"], first
    assert "val 0.9000" in first["header"][1], first["header"]
    events = []
    for step in range(1, 5):
        events.append([progress, {**run, "step": step, "loss": 0.5 - 0.05 * step, "lr": 1e-4, "smooth": 0.4}])
        if step % 2 == 0:
            events.append([validation, {**run, "step": step, "val_loss": 0.3 - 0.05 * step}])
    page.evaluate(SEND_EVENTS, events)
    chart = wait_for_chart(page, train["id"], 4)
    # one run: the steps after the validation at step 0 went on with it
    assert (chart["points"], chart["firstStep"], chart["validation"]) == (4, 1, 3), chart
    assert chart["valLoss"] == pytest.approx(0.1) and "val 0.1000" in chart["header"][1], chart["header"]
    assert chart["xRange"] == [0, 4] and chart["yRange"][0] < 0.1 and chart["yRange"][1] > 0.9, chart
    assert curve_pixels(page, train["id"], VALIDATION_RGB) >= chart["plot"][2] / 2, (
        "the validation series is not on the screen"
    )
    assert curve_pixels(page, train["id"]) >= chart["plot"][2] / 2, "the loss curves are not on the screen"


def test_queued_training_updates_the_live_loss_display(page, server, tmp_path) -> None:
    train = page.evaluate(BUILD_TRAINING_GRAPH, [server.ckpt_name, TRAIN_STEPS, 0])
    assert train["badges"], "the training node shows no badge (the node source badge is on by default)"
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    seen_live = set()
    deadline = time.monotonic() + WAIT_TRAINING_S
    while time.monotonic() < deadline:
        state = page.evaluate("() => ({ done: window.__d2f.done, progress: window.__d2f.progress.slice(-1) })")
        if state["progress"]:
            seen_live.add(state["progress"][0])
        if state["done"]:
            break
        time.sleep(0.25)
    state = page.evaluate("() => window.__d2f")
    page.screenshot(path=str(tmp_path / "training.png"))
    assert state["done"], f"no execution_success within {WAIT_TRAINING_S} s; server log:\n{server.log()[-3000:]}"
    assert state["done"][0]["type"] == "execution_success", state["done"][0]

    events = state["events"]
    assert [e["step"] for e in events] == list(range(1, TRAIN_STEPS + 1)), events
    assert all(e["steps"] == TRAIN_STEPS and math.isfinite(e["loss"]) and e["lr"] > 0 for e in events), events
    drawn = [re.match(r"step (\d+)/(\d+)  loss (\S+)", t) for t in state["progress"]]
    assert all(drawn), state["progress"]
    steps_drawn = [int(m.group(1)) for m in drawn]
    # live: several steps appeared on the canvas while training ran, in order, ending at the last one
    assert len(set(steps_drawn)) >= 2 and steps_drawn == sorted(steps_drawn), state["progress"]
    assert steps_drawn[-1] == TRAIN_STEPS and all(int(m.group(2)) == TRAIN_STEPS for m in drawn)
    assert float(drawn[-1].group(3)) == pytest.approx(events[-1]["loss"], rel=1e-3, abs=1e-4)
    assert len(seen_live) >= 2, f"the display did not change while the prompt ran: {seen_live}"
    # the box behind the text stays clear of the node's badges
    assert state["box"] and state["text"] and state["box"][0] <= state["text"][0] <= state["box"][2], state
    for text, rect in state["badges"].items():
        assert not overlap(state["box"], rect), f"the live loss box {state['box']} covers the badge {text!r} at {rect}"
    assert set(state["badges"]) == set(train["badges"]), f"badges not drawn: {train['badges']} vs {state['badges']}"
    # the chart: every step, axes with labels, the finished run's outcome, green curves on the screen
    chart = wait_for_chart(page, train["id"], TRAIN_STEPS)
    assert chart["points"] == TRAIN_STEPS and chart["firstStep"] == 1 and chart["finished"], chart
    assert chart["lastLoss"] == pytest.approx(events[-1]["loss"], rel=1e-6), (chart, events[-1])
    assert chart["smooth"] == pytest.approx(events[-1]["smooth"], rel=1e-6), (chart, events[-1])
    assert len(chart["yLabels"]) >= 2 and chart["xLabels"] and chart["xLabels"][-1] == str(TRAIN_STEPS), chart
    assert chart["header"][1].startswith("smoothed") and "done in" in chart["header"][1], chart["header"]
    width = page.evaluate("(id) => window.app.graph.getNodeById(id).size[0]", train["id"])
    assert chart["box"][2] == width, "the chart is not as wide as the node"
    assert curve_pixels(page, train["id"]) >= chart["plot"][2] / 2, "the loss curves are not on the screen"
    # resizing the node resizes the chart
    page.evaluate(
        "(id) => { const n = window.app.graph.getNodeById(id); n.setSize([n.size[0] + 200, n.size[1]]); window.app.canvas.setDirty(true, true); }",
        train["id"],
    )
    page.wait_for_function(
        "([id, w]) => window.app.graph.getNodeById(id).diff2flowChart?.box[2] === w", arg=[train["id"], width + 200]
    )
    wider = page.evaluate("(id) => window.app.graph.getNodeById(id).diff2flowChart", train["id"])
    assert wider["plot"][2] == pytest.approx(chart["plot"][2] + 200) and wider["plot"][3] > chart["plot"][3], (
        chart,
        wider,
    )


HISTORY_ROUTE = "/api/diff2flow/training/history"  # nodes/progress.py HISTORY_ROUTE, as ComfyUI also serves it
RELOAD_STEPS = 20  # ~2-3 s a step on 2 busy cores: the page reloads (~10 s) while the run goes on
VALIDATION_EVERY = 5  # validation losses at steps 0, 5, 10, 15 and 20


def server_run(server, node_id: int, prompt_id: str) -> dict:
    """The server's history of the training node's run of that prompt (nodes/progress.py), {} when it has none."""
    runs = [
        r for r in server.get_json(HISTORY_ROUTE)["runs"] if r["node"] == str(node_id) and r["prompt_id"] == prompt_id
    ]
    return runs[-1] if runs else {}


def reload_page(page) -> None:
    page.reload()
    page.wait_for_function(APP_READY, timeout=60_000)


def test_loss_chart_comes_back_after_a_page_reload_during_and_after_the_run(page, server) -> None:
    """A reload during training brings back the steps before it (the server's history) and keeps
    appending the live ones; after the run another reload shows the finished chart again. The run
    has validation losses: they come back with the steps."""
    train = page.evaluate(BUILD_TRAINING_GRAPH, [server.ckpt_name, RELOAD_STEPS, VALIDATION_EVERY])
    # the events of an earlier test's run are not this run's
    page.evaluate("() => { window.__d2f.events = []; window.__d2f.valEvents = []; }")
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    page.wait_for_function(
        "() => new Set(window.__d2f.events.map((e) => e.step)).size >= 2", timeout=WAIT_TRAINING_S * 1000, polling=250
    )
    prompt_id = page.evaluate("() => window.__d2f.events[0].prompt_id")
    assert prompt_id, "the progress event does not name its prompt"
    reload_page(page)
    at_reload = server_run(server, train["id"], prompt_id)
    assert at_reload and at_reload["step"] < RELOAD_STEPS, f"the run ended before the page was back: {at_reload}"
    # the graph came back from the front-end's saved workflow, with the training node under the same id
    assert page.evaluate("(id) => window.app.graph.getNodeById(id)?.type", train["id"]) == "D2F_TrainLoRA"
    mid = wait_for_chart(page, train["id"], at_reload["step"], at_least=True)
    assert mid["firstStep"] == 1 and mid["points"] == mid["lastStep"], (
        f"the steps before the reload did not come back: {mid}"
    )
    # the validation at step 0 (at least) came before the reload: the history brings it back
    assert at_reload["validation"] and at_reload["validation"][0][0] == 0, at_reload
    assert mid["validation"] >= len(at_reload["validation"]) and "val " in mid["header"][1], mid
    # the prompt done (ComfyUI's history has it), not only its last step: the last validation comes after that step
    deadline = time.monotonic() + WAIT_TRAINING_S
    while time.monotonic() < deadline and prompt_id not in server.get_json(f"/api/history/{prompt_id}"):
        time.sleep(0.5)
    final = server_run(server, train["id"], prompt_id)
    assert final.get("finished"), (
        f"the run did not finish within {WAIT_TRAINING_S} s: {final}; log:\n{server.log()[-3000:]}"
    )
    # the steps after the reload: live events, or the history asked again when they stop (ComfyUI can drop a
    # reloaded page's socket, see web/diff2flow.js pollStale)
    chart = wait_for_chart(page, train["id"], RELOAD_STEPS)
    # every step: those from before the reload (history) and those after it (live), once each
    assert chart["firstStep"] == 1 and chart["points"] == RELOAD_STEPS, chart
    assert chart["lastLoss"] == pytest.approx(final["loss"], rel=1e-6) and chart["finished"], (chart, final)
    assert "done in" in chart["header"][1], chart["header"]
    assert curve_pixels(page, train["id"]) >= chart["plot"][2] / 2, "the loss curves are not on the screen"
    # the validation losses: at step 0, every VALIDATION_EVERY steps and at the last step, on the chart as a series
    val_steps = list(range(0, RELOAD_STEPS + 1, VALIDATION_EVERY))
    assert [p[0] for p in final["validation"]] == val_steps, final["validation"]
    assert all(math.isfinite(p[1]) for p in final["validation"]), final["validation"]
    assert chart["validation"] == len(val_steps) and chart["valLoss"] == pytest.approx(final["val_loss"], rel=1e-6)
    assert f"val {final['val_loss']:.4f}" in chart["header"][1], (chart["header"], final["val_loss"])
    low, high = chart["yRange"]
    assert all(low <= p[1] <= high for p in final["validation"]), (chart["yRange"], final["validation"])
    assert curve_pixels(page, train["id"], VALIDATION_RGB) >= 20, "the validation series is not on the screen"

    reload_page(page)  # after the run: the finished chart stays
    again = wait_for_chart(page, train["id"], RELOAD_STEPS)
    for key in ("firstStep", "points", "lastStep", "lastLoss", "smooth", "finished", "yLabels", "xLabels"):
        assert again[key] == chart[key], (key, again, chart)
    assert "done in" in again["header"][1], again["header"]
    for key in ("validation", "valLoss", "valDots", "yRange", "xRange"):
        assert again[key] == chart[key], (key, again, chart)


# ---------------------------------------------------------------------------------------------
# (c) help pages


def test_help_page_opens_in_the_front_end(page) -> None:
    node_id = "D2F_KSampler"
    # the heading of the page as shipped (web/docs/<id>/en.md; a page in the flat layout web/docs/<id>.md gives the
    # heading too, so that it fails on the requests below, which show what the front-end got)
    page_md = next(p for p in (DOCS / node_id / "en.md", DOCS / f"{node_id}.md") if p.is_file()).read_text()
    heading = next(line[2:].strip() for line in page_md.splitlines() if line.startswith("# "))
    wf = json.loads((ROOT / "example_workflows" / "diff2flow_text_to_image.json").read_text())
    load_workflow(page, wf, "browser-test-help")
    page.docs_responses.clear()
    page.evaluate(
        """(type) => { const n = window.app.graph._nodes.find((n) => n.type === type);
        window.app.canvas.deselectAll?.(); window.app.canvas.selectNode(n); window.app.canvas.setDirty(true, true); }""",
        node_id,
    )
    page.locator(".selection-toolbox button:has(i[class*='lucide--info'])").click(timeout=10_000)
    help_box = page.locator(".node-help-content")
    help_box.filter(has_text=heading).wait_for(state="visible", timeout=15_000)
    text = help_box.inner_text()
    inputs = page.evaluate(
        "(t) => window.app.graph._nodes.find((n) => n.type === t).inputs.map((i) => i.name)", node_id
    )
    widgets = page.evaluate(
        "(t) => window.app.graph._nodes.find((n) => n.type === t).widgets.map((w) => w.name)", node_id
    )
    names = {*inputs, *widgets} - {"control_after_generate"}
    assert names and all(name in text for name in names), (
        f"help page lacks inputs: {sorted(n for n in names if n not in text)}"
    )
    first = f"/extensions/{PACK_NAME}/docs/{node_id}/en.md"
    assert page.docs_responses and page.docs_responses[0][0].endswith(first), page.docs_responses
    assert all(status == 200 for _, status in page.docs_responses), page.docs_responses


def test_every_node_help_page_is_served_where_the_front_end_asks_first(server) -> None:
    info = server.get_json("/api/object_info")
    ours = sorted(name for name, node in info.items() if node.get("python_module") == f"custom_nodes.{PACK_NAME}")
    assert "D2F_TrainLoRA" in ours, ours
    for node_id in ours:
        status, headers, body = server.request(f"/extensions/{PACK_NAME}/docs/{node_id}/en.md")
        assert status == 200, f"{node_id}: /extensions/{PACK_NAME}/docs/{node_id}/en.md answered {status}"
        assert "text/html" not in headers.get("Content-Type", ""), headers  # the front-end treats html as missing
        assert body.decode().lstrip().startswith("# "), f"{node_id}: help page does not start with a heading"


# ---------------------------------------------------------------------------------------------
# (d) thumbnails for the Templates browser


def test_every_example_workflow_has_a_thumbnail(server) -> None:
    from PIL import Image

    listed = server.get_json("/api/workflow_templates").get(PACK_NAME, [])
    assert sorted(listed) == [p.stem for p in WORKFLOWS], listed
    for name in listed:
        # the URL the Templates browser asks for: /api/workflow_templates/<pack>/<name>.jpg
        status, headers, body = server.request(f"/api/workflow_templates/{PACK_NAME}/{name}.jpg")
        assert status == 200, f"{name}.jpg answered {status}: run python tests/make_workflow_thumbnails.py"
        assert len(body) <= THUMBNAIL_MAX_BYTES, f"{name}.jpg is {len(body)} bytes"
        image = Image.open(io.BytesIO(body))
        assert image.format == "JPEG" and image.width >= 256 and image.height >= 128, (image.format, image.size)


def test_templates_browser_shows_the_thumbnails(page) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    names = [p.stem for p in WORKFLOWS]
    page.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    shown_all = """(names) => names.every((n) => {
        const img = document.querySelector(`.p-dialog img[alt="${n}"]`);
        return img && img.complete && img.naturalWidth > 0; })"""
    try:
        # the pack's own category (under Extensions) in the dialog's navigation; the dialog fills its
        # navigation while it loads the template index, so a click that lands before that is lost:
        # try it up to three times
        for attempt in range(3):
            try:
                page.locator(".p-dialog").get_by_text(PACK_NAME, exact=True).first.click(timeout=15_000)
                # the cards load each <name>.jpg and show it as an <img alt="<name>"> (a placeholder without it)
                page.wait_for_function(shown_all, arg=names, timeout=15_000)
                break
            except PlaywrightTimeout:
                if attempt == 2:
                    raise
    except PlaywrightTimeout:
        shown = page.evaluate(
            "() => [...document.querySelectorAll('.p-dialog img')].map((i) => [i.alt, i.complete, i.naturalWidth])"
        )
        pytest.fail(f"the Templates browser does not show a thumbnail for each of {names}: {shown}")
    finally:
        page.keyboard.press("Escape")
