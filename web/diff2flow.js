// Diff2Flow toolkit: the loss chart of the "Train Diff2Flow LoRA" node.
// The server sends "diff2flow.train.progress" {node, prompt_id, workflow, step, steps, loss, lr, smooth, eta_s,
// elapsed_s} after every optimizer step and "diff2flow.train.validation" {node, prompt_id, workflow, step, steps,
// val_loss} after every validation evaluation (step 0: before the first step, so it may be the first event of a
// run), and keeps a downsampled history of each run with all its validation losses (nodes/progress.py); the page
// asks for that history when it loads and when a training node is created or loaded, then appends the live
// events. The chart (web/loss_chart.js) is drawn above the node's title and badges, as wide as the node.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { appendStep, appendValidation, drawChart, newRun, newRunAtValidation, num } from "./loss_chart.js";

const EVENT = "diff2flow.train.progress";
const VALIDATION_EVENT = "diff2flow.train.validation";
const HISTORY_ROUTE = "/diff2flow/training/history"; // api.fetchApi adds the /api prefix
const NODE_TYPE = "D2F_TrainLoRA";
const LIVE_FIELDS = ["step", "steps", "loss", "lr", "smooth", "eta_s", "elapsed_s", "finished"];

const POLL_MS = 5000;
const states = new Map(); // node id (string; "a:b" inside a subgraph) -> run (see loss_chart.js)
let executingId = null;
let lastLive = 0; // Date.now() of the last live event

const isTrainNode = (n) => n && (n.type === NODE_TYPE || n.comfyClass === NODE_TYPE);
const graphNodes = () => (app.graph && (app.graph._nodes || app.graph.nodes)) || [];
const graphId = () => app.rootGraph?.id ?? app.graph?.id ?? null;
// a run belongs to this page's workflow when either side does not know its workflow id, or the ids agree
const sameWorkflow = (run) => !run.workflow || !graphId() || run.workflow === graphId();

function stateOf(node) {
  const id = String(node.id);
  let run = states.get(id);
  if (!run && node.graph && node.graph !== (app.rootGraph ?? app.graph)) {
    // a node inside a subgraph executes as "<subgraph node id>:<its id>"
    run = [...states.entries()].find(([key]) => key.endsWith(`:${id}`))?.[1];
  }
  return run && sameWorkflow(run) ? run : null;
}

// The runs an event goes to. With its node: that node's run, a new one for another prompt. Without it
// (report_progress outside ComfyUI's executing-node context): the executing training node's run, else every
// training node's, a new one where ended(run) says the event cannot continue it.
function eventRuns(data, ended) {
  if (data.node != null) {
    const key = String(data.node);
    let run = states.get(key);
    if (!run || run.prompt_id !== data.prompt_id) {
      run = newRun({ node: key, prompt_id: data.prompt_id, workflow: data.workflow ?? null });
      states.set(key, run);
    }
    return [run];
  }
  const byId = executingId != null && app.graph?.getNodeById?.(executingId);
  return (isTrainNode(byId) ? [byId] : graphNodes().filter(isTrainNode)).map((node) => {
    const key = String(node.id);
    let run = states.get(key);
    if (!run || ended(run)) states.set(key, (run = newRun({ node: key })));
    return run;
  });
}

function onProgress(event) {
  const data = (event && event.detail) || {};
  lastLive = Date.now();
  const step = num(data.step);
  // a step at or below the run's last one: a repeat (with the node), or a new run (without it)
  const behind = (run) => step !== null && run.step !== null && data.step <= run.step;
  for (const run of eventRuns(data, behind)) if (!behind(run)) appendStep(run, data);
  app.graph?.setDirtyCanvas?.(true, false);
}

function onValidation(event) {
  const data = (event && event.detail) || {};
  lastLive = Date.now();
  const step = num(data.step);
  // the validation at step 0 comes before the first step: it starts the run the steps then go on
  for (const run of eventRuns(data, (r) => newRunAtValidation(r, step))) appendValidation(run, data);
  app.graph?.setDirtyCanvas?.(true, false);
}

function applyHistory(answer) {
  const latest = new Map(); // node -> its most recently updated run of this workflow
  for (const run of answer?.runs || []) if (run && run.node != null && sameWorkflow(run)) latest.set(String(run.node), run);
  for (const [key, run] of latest) {
    const fresh = newRun({ ...run, node: key, points: (run.points || []).map((p) => [...p]),
                           validation: (run.validation || []).map((p) => [...p]) });
    const local = states.get(key);
    if (local && local.prompt_id === run.prompt_id) {
      // live events that came in while the history was on its way: keep the steps it does not have yet
      const end = fresh.points[fresh.points.length - 1]?.[1] ?? -Infinity;
      for (const p of local.points) if (p[0] > end) fresh.points.push([...p]);
      if ((local.step ?? 0) > (run.step ?? 0)) for (const k of LIVE_FIELDS) fresh[k] = local[k];
      const valEnd = fresh.validation[fresh.validation.length - 1]?.[0] ?? -Infinity;
      for (const p of local.validation || []) if (p[0] > valEnd) appendValidation(fresh, { step: p[0], val_loss: p[1] });
      fresh.stopped = local.stopped;
    }
    fresh.val_loss = fresh.validation[fresh.validation.length - 1]?.[1] ?? num(fresh.val_loss); // the last point's
    states.set(key, fresh);
  }
  // a run the server no longer has (restarted) is not running any more
  const known = new Set((answer?.runs || []).map((r) => `${r?.node}|${r?.prompt_id}`));
  for (const run of states.values()) if (run.prompt_id && !known.has(`${run.node}|${run.prompt_id}`)) run.running = false;
  app.graph?.setDirtyCanvas?.(true, false);
}

let pending = null;
function loadHistory() {
  // one request at a time: a workflow load creates its nodes in a burst
  pending ??= (async () => {
    try {
      const response = await api.fetchApi?.(HISTORY_ROUTE, { cache: "no-store" });
      if (response?.ok) applyHistory(await response.json());
    } catch (err) {
      console.warn("diff2flow: training history not loaded", err);
    } finally {
      pending = null;
    }
  })();
  return pending;
}

// Live events sent while the page loads (after its history request, before its socket is open) are lost, and
// ComfyUI 0.8.0 can drop a reloaded page's socket from its broadcast list (server.py: when the old socket of the
// same client id closes after the new one opened): while a run is in progress and no live event came for
// POLL_MS, ask the history again. A run with validation losses gets its last one after its last step: a finished
// run whose prompt still executes (the history's `running`) without the validation of its last step is polled too.
const awaitsLastValidation = (r) =>
  r.finished && r.running === true && r.validation?.length > 0 && r.validation[r.validation.length - 1][0] < r.steps;
function pollStale() {
  const active = [...states.values()].some((r) => !r.stopped && ((!r.finished && r.running !== false) || awaitsLastValidation(r)));
  if (active && Date.now() - lastLive > POLL_MS) loadHistory();
}

function stopRun(event) {
  const promptId = event?.detail?.prompt_id;
  for (const run of states.values()) if (!run.finished && (!promptId || run.prompt_id === promptId)) run.stopped = true;
  app.graph?.setDirtyCanvas?.(true, false);
}

function chartBox(node) {
  const title = globalThis.LiteGraph?.NODE_TITLE_HEIGHT || 30, width = num(node.size?.[0]) ?? 300;
  // LiteGraph draws the node's badges (source pack, node id) in a row right above the title: stay above them
  const badges = (node.badges || []).map((b) => (typeof b === "function" ? b() : b)).filter((b) => b && b.visible !== false);
  const badgeRow = badges.length ? Math.max(...badges.map((b) => num(b.height) ?? 20)) + 2 : 0;
  const height = Math.round(Math.min(280, Math.max(130, width * 0.5))); // grows and shrinks with the node's width
  return [0, -title - badgeRow - height - 4, width, height];
}

function drawProgress(node, ctx) {
  const run = stateOf(node);
  if (!run || !ctx || node.flags?.collapsed) return;
  ctx.save();
  try {
    node.diff2flowChart = drawChart(ctx, run, chartBox(node)); // what was drawn, for tests
  } finally {
    ctx.restore();
  }
}

app.registerExtension({
  name: "diff2flow.training",
  setup() {
    api.addEventListener(EVENT, (event) => {
      try {
        onProgress(event);
      } catch (err) {
        console.warn("diff2flow: progress event ignored", err);
      }
    });
    api.addEventListener(VALIDATION_EVENT, (event) => {
      try {
        onValidation(event);
      } catch (err) {
        console.warn("diff2flow: validation event ignored", err);
      }
    });
    api.addEventListener("executing", (event) => {
      executingId = event?.detail ?? null; // the node id (string), null when the prompt is done
    });
    api.addEventListener("execution_interrupted", stopRun);
    api.addEventListener("execution_error", stopRun);
    setInterval(pollStale, POLL_MS)?.unref?.(); // unref: a test under Node.js may exit
    return loadHistory();
  },
  nodeCreated(node) {
    if (isTrainNode(node)) loadHistory();
  },
  loadedGraphNode(node) {
    if (isTrainNode(node)) loadHistory();
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData || nodeData.name !== NODE_TYPE) return;
    const original = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx, ...rest) {
      const result = original ? original.apply(this, [ctx, ...rest]) : undefined;
      try {
        drawProgress(this, ctx);
      } catch (err) {
        // drawing must never break the canvas
      }
      return result;
    };
  },
});
