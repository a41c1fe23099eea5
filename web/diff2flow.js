// Diff2Flow toolkit: live training progress on the "Train Diff2Flow LoRA" node.
// The server sends "diff2flow.train.progress" {step, steps, loss, lr} after every optimizer step;
// the node that is executing shows "step s/N  loss x  lr y" and a sparkline of the recent losses.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EVENT = "diff2flow.train.progress";
const NODE_TYPE = "D2F_TrainLoRA";
const HISTORY = 200; // losses kept for the sparkline
const BOX_HEIGHT = 44; // drawn above the title and the badges, so it never covers widgets or badges

const states = new Map(); // node id (string) -> {step, steps, loss, lr, losses}
let executingId = null;

const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);
const fmt = (v, digits) => (num(v) === null ? "?" : Math.abs(v) >= 1e-3 || v === 0 ? v.toFixed(digits) : v.toExponential(2));

function graphNodes() {
  const graph = app.graph;
  return (graph && (graph._nodes || graph.nodes)) || [];
}

function trainingNodes() {
  // the executing node when it is a training node, otherwise every training node in the graph
  const byId = executingId != null && app.graph?.getNodeById?.(executingId);
  if (byId && (byId.type === NODE_TYPE || byId.comfyClass === NODE_TYPE)) return [byId];
  return graphNodes().filter((n) => n && (n.type === NODE_TYPE || n.comfyClass === NODE_TYPE));
}

function onProgress(event) {
  const data = (event && event.detail) || {};
  const step = num(data.step);
  for (const node of trainingNodes()) {
    const key = String(node.id);
    let state = states.get(key);
    if (!state || (step !== null && state.step !== null && step <= state.step)) {
      // a new run (the step went back): start a fresh history
      state = { step: null, steps: null, loss: null, lr: null, losses: [] };
      states.set(key, state);
    }
    state.step = step;
    state.steps = num(data.steps);
    state.loss = num(data.loss);
    state.lr = num(data.lr);
    if (state.loss !== null) {
      state.losses.push(state.loss);
      if (state.losses.length > HISTORY) state.losses.splice(0, state.losses.length - HISTORY);
    }
    node.setDirtyCanvas?.(true, false);
  }
  app.graph?.setDirtyCanvas?.(true, false);
}

function drawSparkline(ctx, losses, x, y, w, h) {
  if (losses.length < 2) return;
  const lo = Math.min(...losses);
  const hi = Math.max(...losses);
  const span = hi - lo || 1;
  ctx.beginPath();
  losses.forEach((v, i) => {
    const px = x + (i / (losses.length - 1)) * w;
    const py = y + h - ((v - lo) / span) * h;
    if (i === 0) ctx.moveTo(px, py);
    else ctx.lineTo(px, py);
  });
  ctx.strokeStyle = "#7bd88f";
  ctx.lineWidth = 1.5;
  ctx.stroke();
}

function drawProgress(node, ctx) {
  const state = states.get(String(node.id));
  if (!state || !ctx || node.flags?.collapsed) return;
  const title = (globalThis.LiteGraph && globalThis.LiteGraph.NODE_TITLE_HEIGHT) || 30, width = num(node.size?.[0]) ?? 300;
  // LiteGraph draws the node's badges (source pack, node id) in a row right above the title: stay above them
  const badges = (node.badges || []).map((b) => (typeof b === "function" ? b() : b)).filter((b) => b && b.visible !== false);
  const badgeRow = badges.length ? Math.max(...badges.map((b) => num(b.height) ?? 20)) + 2 : 0;
  const top = -title - badgeRow - BOX_HEIGHT - 4;
  ctx.save();
  ctx.fillStyle = "rgba(20, 20, 20, 0.85)";
  ctx.fillRect(0, top, width, BOX_HEIGHT);
  ctx.fillStyle = "#ddd";
  ctx.font = "12px monospace";
  ctx.textBaseline = "top";
  const steps = state.steps === null ? "?" : state.steps;
  const step = state.step === null ? "?" : state.step;
  ctx.fillText(`step ${step}/${steps}  loss ${fmt(state.loss, 4)}  lr ${fmt(state.lr, 6)}`, 6, top + 4);
  drawSparkline(ctx, state.losses, 6, top + 20, width - 12, BOX_HEIGHT - 24);
  ctx.restore();
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
    api.addEventListener("executing", (event) => {
      executingId = event?.detail ?? null; // the node id (string), null when the prompt is done
    });
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
