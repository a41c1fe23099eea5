// Diff2Flow toolkit: the loss chart of a training run (no ComfyUI imports: web/diff2flow.js wires it).
// A run is {node, prompt_id, workflow, step, steps, loss, lr, smooth, eta_s, elapsed_s, finished, points,
// stride, validation, val_loss}; points are buckets of consecutive optimizer steps [first step, last step,
// lowest loss, highest loss, last loss, smoothed loss], the layout of the server's history (nodes/progress.py);
// validation is every validation loss of the run, [step, loss] in step order (step 0: before training), and
// val_loss the last of them: a second series on the same axes (dots joined by a line).
export const MAX_POINTS = 2048; // buckets kept on the page per run; merged in pairs beyond

const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);
export { num };

export function formatNumber(v, digits = 4) {
  if (num(v) === null) return "?";
  if (v === 0) return "0";
  return Math.abs(v) >= 1e-3 && Math.abs(v) < 1e5 ? v.toFixed(digits) : v.toExponential(2);
}

export function formatDuration(s) {
  if (num(s) === null) return "?";
  const t = Math.max(0, Math.round(s)), h = Math.floor(t / 3600), m = Math.floor((t % 3600) / 60), sec = t % 60;
  const pad = (x) => String(x).padStart(2, "0");
  return h ? `${h}:${pad(m)}:${pad(sec)}` : `${m}:${pad(sec)}`;
}

export function newRun(fields = {}) {
  return { step: null, steps: null, loss: null, lr: null, smooth: null, eta_s: null, elapsed_s: null, finished: false,
           stopped: false, running: null, points: [], stride: 1, validation: [], val_loss: null, ...fields };
}

/** Add one validation loss (the validation event: {step, steps, val_loss}) to a run: one point per step, in step order. */
export function appendValidation(run, ev) {
  const step = num(ev.step), loss = num(ev.val_loss);
  if (run.steps === null) run.steps = num(ev.steps);
  if (step === null || loss === null) return;
  const points = (run.validation || []).filter((p) => p[0] !== step);
  points.push([step, loss]);
  points.sort((a, b) => a[0] - b[0]);
  run.validation = points;
  run.val_loss = points[points.length - 1][1];
}

/** Would a validation at `step` not belong to the run (the same node trains again)? As nodes/progress.py decides. */
export function newRunAtValidation(run, step) {
  const last = run.validation?.[run.validation.length - 1]?.[0];
  return step !== null && ((run.step !== null && step < run.step) || (last !== undefined && step <= last));
}

/** Append one live step (the progress event) to a run, as the server does: stride-aligned buckets, merged in pairs. */
export function appendStep(run, ev, maxPoints = MAX_POINTS) {
  const step = num(ev.step), loss = num(ev.loss);
  for (const k of ["step", "steps", "loss", "lr", "smooth", "eta_s", "elapsed_s"]) run[k] = num(ev[k]);
  run.finished = run.step !== null && run.steps !== null && run.step >= run.steps;
  if (step === null || loss === null) return;
  const smooth = num(ev.smooth) ?? loss;
  const last = run.points[run.points.length - 1];
  if (last && Math.floor(step / run.stride) === Math.floor(last[0] / run.stride)) {
    last[1] = step; last[2] = Math.min(last[2], loss); last[3] = Math.max(last[3], loss); last[4] = loss; last[5] = smooth;
  } else run.points.push([step, step, loss, loss, loss, smooth]);
  if (run.points.length > maxPoints) {
    run.stride *= 2;
    const merged = [];
    for (const b of run.points) {
      const p = merged[merged.length - 1];
      if (p && Math.floor(b[0] / run.stride) === Math.floor(p[0] / run.stride)) {
        p[1] = b[1]; p[2] = Math.min(p[2], b[2]); p[3] = Math.max(p[3], b[3]); p[4] = b[4]; p[5] = b[5];
      } else merged.push([...b]);
    }
    run.points = merged;
  }
}

/** The buckets downsampled to at most n columns over the steps they span: min of lows, max of highs (spikes stay). */
export function columns(points, n) {
  if (!points.length || n < 1) return [];
  const x0 = points[0][0], x1 = points[points.length - 1][1], span = Math.max(1, x1 - x0 + 1);
  const cols = [];
  for (const b of points) {
    const i = Math.min(n - 1, Math.floor(((b[1] - x0) / span) * n));
    const c = cols[cols.length - 1];
    if (c && c.i === i) {
      c.s1 = b[1]; c.lo = Math.min(c.lo, b[2]); c.hi = Math.max(c.hi, b[3]); c.last = b[4]; c.smooth = b[5];
    } else cols.push({ i, s0: b[0], s1: b[1], lo: b[2], hi: b[3], last: b[4], smooth: b[5] });
  }
  return cols;
}

/** About `count` round tick values in [lo, hi] (1, 2 or 5 times a power of ten apart). */
export function niceTicks(lo, hi, count = 4, integer = false) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / Math.max(1, count);
  const mag = 10 ** Math.floor(Math.log10(raw));
  let step = [1, 2, 5, 10].map((f) => f * mag).find((s) => s >= raw) ?? 10 * mag;
  if (integer) step = Math.max(1, Math.round(step));
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(Number(v.toPrecision(12)));
  return ticks;
}

function tickLabel(v, ticks) {
  const step = ticks.length > 1 ? Math.abs(ticks[1] - ticks[0]) : Math.abs(v) || 1;
  if (Math.abs(v) >= 1e5 || (step < 1e-3 && v !== 0)) return v.toExponential(1);
  return v.toFixed(Math.max(0, Math.min(6, -Math.floor(Math.log10(step)))));
}

/** The two text lines above the chart: "step s/N  loss x  lr y" and the smoothed loss, the last validation loss
 * ("val x", once there is one) and the ETA or the outcome. */
export function headerLines(run) {
  const step = run.step === null ? "?" : run.step, steps = run.steps === null ? "?" : run.steps;
  const first = `step ${step}/${steps}  loss ${formatNumber(run.loss)}  lr ${formatNumber(run.lr, 6)}`;
  let state;
  if (run.finished) state = `done in ${formatDuration(run.elapsed_s)}`;
  else if (run.stopped || run.running === false) state = `stopped at step ${step}`;
  else state = `ETA ${formatDuration(run.eta_s)}  elapsed ${formatDuration(run.elapsed_s)}`;
  const val = num(run.val_loss) === null ? "" : `val ${formatNumber(run.val_loss)}  `;
  return [first, `smoothed ${formatNumber(run.smooth)}  ${val}${state}`];
}

export const COLORS = { back: "rgba(20, 20, 20, 0.88)", text: "#ddd", axis: "#888", grid: "rgba(255, 255, 255, 0.08)",
                        range: "rgba(123, 216, 143, 0.35)", raw: "rgba(123, 216, 143, 0.55)", smooth: "#7bd88f",
                        validation: "#f5a742" };

/** Draw the run into the box (node coordinates); returns what was drawn (for tests and tooltips). */
export function drawChart(ctx, run, [x, y, w, h]) {
  ctx.fillStyle = COLORS.back;
  ctx.fillRect(x, y, w, h);
  ctx.font = "12px monospace";
  ctx.textBaseline = "top";
  ctx.textAlign = "left";
  ctx.fillStyle = COLORS.text;
  const header = headerLines(run);
  header.forEach((line, i) => ctx.fillText(line, x + 6, y + 4 + i * 15));
  ctx.font = "10px monospace";
  const plot = { x: x + 52, y: y + 40, w: w - 52 - 10, h: h - 40 - 18 };
  const val = (run.validation || []).filter((p) => num(p?.[0]) !== null && num(p?.[1]) !== null);
  const drawn = { points: run.points.length, columns: 0, firstStep: run.points[0]?.[0] ?? null, lastStep: run.step,
                  steps: run.steps, lastLoss: run.loss, smooth: run.smooth, finished: run.finished, header,
                  validation: val.length, valLoss: run.val_loss ?? null, valDots: [], yRange: null, xRange: null,
                  xLabels: [], yLabels: [], box: [x, y, w, h], plot: [plot.x, plot.y, plot.w, plot.h] };
  if (plot.w < 20 || plot.h < 20 || (!run.points.length && !val.length)) return drawn;
  const cols = columns(run.points, Math.floor(plot.w));
  drawn.columns = cols.length;
  // one y scale for both series: the training losses (ranges and smoothed) and the validation losses
  const lows = [...cols.map((c) => Math.min(c.lo, c.smooth)), ...val.map((p) => p[1])];
  const highs = [...cols.map((c) => Math.max(c.hi, c.smooth)), ...val.map((p) => p[1])];
  let lo = Math.min(...lows), hi = Math.max(...highs);
  const pad = hi > lo ? (hi - lo) * 0.06 : Math.abs(lo) * 0.1 || 1;
  lo -= pad; hi += pad;
  // the steps of both: the validation at step 0 (before training) left of the first step
  const starts = [...(run.points.length ? [run.points[0][0]] : []), ...(val.length ? [val[0][0]] : [])];
  const ends = [...(run.points.length ? [run.points[run.points.length - 1][1]] : []), ...(val.length ? [val[val.length - 1][0]] : [])];
  const s0 = Math.min(...starts), s1 = Math.max(...ends, s0 + 1);
  drawn.yRange = [lo, hi]; drawn.xRange = [s0, s1];
  const px = (s) => plot.x + ((s - s0) / (s1 - s0)) * plot.w;
  const py = (v) => plot.y + plot.h - ((v - lo) / (hi - lo)) * plot.h;
  // axes: loss ticks on the left, step ticks below
  const yTicks = niceTicks(lo, hi, Math.max(2, Math.floor(plot.h / 30)));
  const xTicks = niceTicks(s0, s1, Math.max(2, Math.floor(plot.w / 70)), true);
  ctx.lineWidth = 1;
  ctx.textBaseline = "middle";
  ctx.textAlign = "right";
  for (const v of yTicks) {
    const label = tickLabel(v, yTicks);
    ctx.strokeStyle = COLORS.grid;
    ctx.beginPath(); ctx.moveTo(plot.x, py(v)); ctx.lineTo(plot.x + plot.w, py(v)); ctx.stroke();
    ctx.fillStyle = COLORS.axis;
    ctx.fillText(label, plot.x - 4, py(v));
    drawn.yLabels.push(label);
  }
  ctx.textBaseline = "top";
  ctx.textAlign = "center";
  for (const s of xTicks) {
    ctx.fillText(String(s), px(s), plot.y + plot.h + 4);
    drawn.xLabels.push(String(s));
  }
  ctx.strokeStyle = COLORS.axis;
  ctx.beginPath(); ctx.moveTo(plot.x, plot.y); ctx.lineTo(plot.x, plot.y + plot.h); ctx.lineTo(plot.x + plot.w, plot.y + plot.h); ctx.stroke();
  // per column: the range of the losses (a spike stays a line to its height), the raw loss, the smoothed loss
  ctx.strokeStyle = COLORS.range;
  ctx.beginPath();
  for (const c of cols) { const cx = Math.round(px(c.s1)) + 0.5; ctx.moveTo(cx, py(c.hi) - 0.5); ctx.lineTo(cx, py(c.lo) + 0.5); }
  ctx.stroke();
  for (const [key, color, width] of [["last", COLORS.raw, 1], ["smooth", COLORS.smooth, 2]]) {
    ctx.strokeStyle = color; ctx.lineWidth = width;
    ctx.beginPath();
    cols.forEach((c, i) => (i ? ctx.lineTo(px(c.s1), py(c[key])) : ctx.moveTo(px(c.s1), py(c[key]))));
    if (cols.length === 1) ctx.lineTo(px(cols[0].s1) + 1, py(cols[0][key]));
    ctx.stroke();
  }
  // the validation losses: dots joined by a line, over the training curves
  if (val.length) {
    const dots = val.map(([s, v]) => [px(s), py(v)]);
    ctx.strokeStyle = COLORS.validation; ctx.fillStyle = COLORS.validation; ctx.lineWidth = 1.5;
    ctx.beginPath();
    dots.forEach(([dx, dy], i) => (i ? ctx.lineTo(dx, dy) : ctx.moveTo(dx, dy)));
    ctx.stroke();
    for (const [dx, dy] of dots) { ctx.beginPath(); ctx.arc(dx, dy, 3, 0, 2 * Math.PI); ctx.fill(); }
    drawn.valDots = dots;
  }
  return drawn;
}
