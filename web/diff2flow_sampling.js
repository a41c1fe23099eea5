// Diff2Flow toolkit: which steps and cfg the "Diff2Flow KSampler" node used.
// The node returns ui {text: ["euler, 2 steps, cfg 1: recommended by LoRA '...' ..."]} (a LoRA's
// recommended values, or the widgets'); the last one is drawn in a line under the node.
import { app } from "../../scripts/app.js";

const NODE_TYPE = "D2F_KSampler";
const MAX_CHARS = 90; // the line is cut here; the full text is in the console log and the history

function usedText(output) {
  const text = output && Array.isArray(output.text) ? output.text[0] : null;
  return typeof text === "string" && text ? text : null;
}

function drawUsed(node, ctx) {
  const text = node.__d2fUsed;
  if (!text || !ctx || node.flags?.collapsed) return;
  const height = (Array.isArray(node.size) && Number.isFinite(node.size[1]) ? node.size[1] : 0) + 4;
  ctx.save();
  ctx.fillStyle = "#9ab";
  ctx.font = "11px monospace";
  ctx.textBaseline = "top";
  ctx.fillText(text.length > MAX_CHARS ? text.slice(0, MAX_CHARS - 1) + "…" : text, 4, height);
  ctx.restore();
}

app.registerExtension({
  name: "diff2flow.sampling",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData || nodeData.name !== NODE_TYPE) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output, ...rest) {
      const result = onExecuted ? onExecuted.apply(this, [output, ...rest]) : undefined;
      this.__d2fUsed = usedText(output);
      this.setDirtyCanvas?.(true, false);
      return result;
    };
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx, ...rest) {
      const result = onDrawForeground ? onDrawForeground.apply(this, [ctx, ...rest]) : undefined;
      try {
        drawUsed(this, ctx);
      } catch (err) {
        // drawing must never break the canvas
      }
      return result;
    };
  },
});
