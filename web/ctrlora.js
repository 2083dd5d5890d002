// CtrLoRA in the ComfyUI page: what a loaded LoRA file is, the training loss curve, and inline messages.
//
// * Load CtrLoRA: once it has run, the node shows the file's condition, rank, key count and size, and for a
//   released file what it was trained on and which node makes its condition image (its UI output "ctrlora_lora").
// * Training: the loss curve and step counter are drawn on the training node from the
//   "ctrlora.train.progress" events the node sends while it runs; its report stays on it afterwards.
// * Messages on the node itself: an error raised by one of the pack's nodes, a warning one of them sends
//   while it runs (e.g. Apply CtrLoRA given a latent from VAE Encode), and a model file the workflow names
//   that is not in the models folder (with where to put it).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TRAIN_EVENT = "ctrlora.train.progress";
const WARNING_EVENT = "ctrlora.node.warning";
const LORA_NODE = "CtrLoRALoad";
const TRAIN_NODE = /^CtrLoRATrain/;
const MODEL_WIDGETS = {
  CtrLoRALoadBase: { widget: "base_name", folder: "models/ctrlora/ (or models/controlnet/)" },
  CtrLoRALoad: { widget: "lora_name", folder: "models/ctrlora/" },
};
const DOWNLOAD_HINT = "Released files: huggingface.co/xyfJASON/ctrlora";
const XL_HINT = "CtrLoRA-XL files: huggingface.co/Savlim/CtrLoRA-XL";
const FONT = "12px Arial, sans-serif";
const LINE = 16;
const PAD = 8;
const MARGIN = 10;
const TONES = {
  info: { bg: "rgba(60, 110, 170, 0.25)", border: "#4a7fb8", text: "#d8e6f5" },
  error: { bg: "rgba(170, 40, 40, 0.35)", border: "#d04040", text: "#ffd9d9" },
  hint: { bg: "rgba(170, 120, 20, 0.30)", border: "#d0a030", text: "#ffefc8" },
};

const isOurs = (node) => (node?.comfyClass ?? node?.type ?? "").startsWith("CtrLoRA");

let measureContext = null;
function wrap(text, width) {
  measureContext ??= document.createElement("canvas").getContext("2d");
  measureContext.font = FONT;
  const lines = [];
  for (const paragraph of String(text).split("\n")) {
    let line = "";
    for (let word of paragraph.split(/\s+/)) {
      const next = line ? `${line} ${word}` : word;
      if (measureContext.measureText(next).width <= width) {
        line = next;
        continue;
      }
      if (line) lines.push(line);
      // A word wider than the box (a file name) is cut where it fills a line.
      while (measureContext.measureText(word).width > width && word.length > 1) {
        let cut = word.length - 1;
        while (cut > 1 && measureContext.measureText(word.slice(0, cut)).width > width) cut -= 1;
        lines.push(word.slice(0, cut));
        word = word.slice(cut);
      }
      line = word;
    }
    lines.push(line);
  }
  return lines;
}

function refresh(node) {
  // Grow to fit the panels; shrink back no further than the size the node had before its first panel.
  node.ctrloraMinHeight ??= node.size[1];
  const wanted = node.computeSize();
  node.setSize([Math.max(node.size[0], wanted[0]), Math.max(wanted[1], node.ctrloraMinHeight)]);
  redraw(node);
}

// The classic canvas redraws when marked dirty; Nodes 2.0 (Vue nodes) draws each of our widgets into a canvas of its
// own, redrawn only through the triggerDraw it gives the widget, at the height of its last canvas layout
// (computedHeight) if it had one: a panel that was empty then gets its new height here.
function redraw(node) {
  for (const widget of node.widgets ?? []) {
    if (!widget.name?.startsWith("ctrlora_") || !widget.triggerDraw) continue;
    widget.computedHeight = Math.max(0, widget.computeSize(node.size[0])[1]);
    widget.triggerDraw();
  }
  node.setDirtyCanvas?.(true, true);
  app.graph?.setDirtyCanvas(true, true);
}

// A text panel drawn on the node (not saved with the workflow, not sent with the prompt).
function panel(node, name) {
  const existing = node.widgets?.find((w) => w.name === name);
  if (existing) return existing;
  const widget = {
    name,
    type: "ctrlora_panel",
    value: "",
    serialize: false,
    options: { serialize: false },
    text: "",
    tone: "info",
    lineCache: null,
    lines(width) {
      const inner = Math.max(40, width - 2 * MARGIN - 2 * PAD);
      if (!this.lineCache || this.lineCache.width !== inner || this.lineCache.text !== this.text) {
        this.lineCache = { width: inner, text: this.text, lines: this.text ? wrap(this.text, inner) : [] };
      }
      return this.lineCache.lines;
    },
    computeSize(width) {
      const lines = this.lines(width ?? node.size[0]);
      return lines.length ? [width, lines.length * LINE + 2 * PAD + 4] : [0, -4];
    },
    draw(ctx, _node, width, y) {
      const lines = this.lines(width);
      if (!lines.length) return;
      const tone = TONES[this.tone] ?? TONES.info;
      const height = lines.length * LINE + 2 * PAD;
      ctx.save();
      ctx.fillStyle = tone.bg;
      ctx.strokeStyle = tone.border;
      ctx.beginPath();
      ctx.roundRect?.(MARGIN, y + 2, width - 2 * MARGIN, height, 4) ?? ctx.rect(MARGIN, y + 2, width - 2 * MARGIN, height);
      ctx.fill();
      ctx.stroke();
      ctx.fillStyle = tone.text;
      ctx.font = FONT;
      ctx.textAlign = "left";
      ctx.textBaseline = "top";
      lines.forEach((line, i) => ctx.fillText(line, MARGIN + PAD, y + 2 + PAD + i * LINE));
      ctx.restore();
    },
    set(text, tone = "info") {
      this.text = text ?? "";
      this.tone = tone;
      this.value = this.text;
      refresh(node);
    },
  };
  node.addCustomWidget(widget);
  return node.widgets.find((w) => w.name === name) ?? widget;
}

// --- Load CtrLoRA: what the file is -------------------------------------------------------------------------
function formatBytes(bytes) {
  if (!Number.isFinite(bytes)) return "";
  const units = ["B", "kB", "MB", "GB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return `${value.toFixed(value >= 100 || unit === 0 ? 0 : 1)} ${units[unit]}`;
}

export function describeLora(info) {
  const parts = [];
  parts.push(`${info.condition || "unknown condition"} · rank ${info.rank}`);
  parts.push(`${info.keys} keys · ${formatBytes(info.size_bytes)}`);
  if (info.trained) parts.push(`trained on ${info.trained}`);
  if (info.released) parts.push(info.released);
  for (const [key, value] of Object.entries(info.metadata ?? {})) parts.push(`${key}: ${value}`);
  if (info.expects) parts.push(`Condition image: ${info.expects}`);
  return parts.join("\n");
}

// --- Training: loss curve and step counter ------------------------------------------------------------------
const CHART_HEIGHT = 176;
const CHART_BUCKETS = 512; // more than a node's plot has pixels across
const COLORS = { train: "#6fb3ff", trainFaint: "rgba(111, 179, 255, 0.35)", val: "#ffa040", bad: "#ff3b3b" };
const FINISHED = { done: "done", cancelled: "cancelled", error: "error", reused: "reused" };

// One curve of a run, downsampled: at most CHART_BUCKETS buckets of equal step width, each with the count, sum, min
// and max of its finite values and the count of its non-finite ones. When a point falls past the last bucket the
// width doubles and neighbours merge, so a point costs O(1) amortised and a 1,000,000-step run holds 512 buckets.
class Series {
  constructor() {
    this.buckets = [];
    this.origin = null;
    this.width = 1;
    this.count = 0;
    this.nonFinite = 0;
    this.lo = Infinity;
    this.hi = -Infinity;
    this.first = null;
    this.last = null;
  }

  // Points come in step order (the events of one run); a repeated or earlier step is ignored.
  add(step, value) {
    step = Number(step);
    if (!Number.isFinite(step) || (this.last && step <= this.last[0])) return;
    const finite = typeof value === "number" && Number.isFinite(value);
    this.origin ??= step;
    while (step - this.origin >= this.width * CHART_BUCKETS) this.widen();
    const index = Math.floor((step - this.origin) / this.width);
    const bucket = (this.buckets[index] ??= { first: step, last: step, n: 0, sum: 0, min: Infinity, max: -Infinity, nonFinite: 0 });
    bucket.last = step;
    if (finite) {
      bucket.n += 1;
      bucket.sum += value;
      if (value < bucket.min) bucket.min = value;
      if (value > bucket.max) bucket.max = value;
      if (value < this.lo) this.lo = value;
      if (value > this.hi) this.hi = value;
    } else {
      bucket.nonFinite += 1;
      this.nonFinite += 1;
    }
    this.count += 1;
    this.last = [step, finite ? value : null];
    this.first ??= this.last;
  }

  widen() {
    const merged = [];
    this.buckets.forEach((bucket, index) => {
      if (!bucket) return;
      const into = merged[index >> 1];
      if (!into) {
        merged[index >> 1] = bucket;
        return;
      }
      into.last = bucket.last;
      into.n += bucket.n;
      into.sum += bucket.sum;
      into.min = Math.min(into.min, bucket.min);
      into.max = Math.max(into.max, bucket.max);
      into.nonFinite += bucket.nonFinite;
    });
    this.buckets = merged;
    this.width *= 2;
  }

  // The filled buckets in step order, each placed at the middle of the steps it holds.
  filled() {
    const out = [];
    for (const bucket of this.buckets) if (bucket) out.push({ ...bucket, step: (bucket.first + bucket.last) / 2 });
    return out;
  }
}

// Exponential moving average of the bucket means over about a twentieth of them (at least 5).
function smooth(buckets) {
  const alpha = 2 / (Math.max(5, buckets.length / 20) + 1);
  let average = null;
  return buckets.map((b) => {
    average = average === null ? b.sum / b.n : alpha * (b.sum / b.n) + (1 - alpha) * average;
    return [b.step, average];
  });
}

const formatLoss = (value) => (value === null ? "non-finite" : value.toFixed(4));

function lossChart(node) {
  const existing = node.widgets?.find((w) => w.name === "ctrlora_loss");
  if (existing) return existing;
  const widget = {
    name: "ctrlora_loss",
    type: "ctrlora_loss",
    value: "",
    serialize: false,
    options: { serialize: false },
    train: new Series(),
    val: new Series(),
    step: 0,
    total: 0,
    phase: "",
    status: "",
    speed: 0,
    skipped: 0,
    message: "",
    output: "",
    run: null,
    computeSize(width) {
      return [width, CHART_HEIGHT];
    },
    reset(run) {
      Object.assign(this, {
        train: new Series(), val: new Series(), step: 0, total: 0, phase: "", status: "", speed: 0, skipped: 0,
        message: "", output: "", run,
      });
    },
    update(detail) {
      // A run is one node of one prompt (a subgraph used twice runs the same inner node under two ids).
      const run = `${detail.prompt_id ?? ""}|${detail.node ?? ""}`;
      if (run !== this.run) this.reset(run);
      const restarted = detail.phase === "train" && this.phase === "train" && Number(detail.step) < this.step;
      if (restarted && detail.status === "running") this.reset(run);
      this.phase = detail.phase ?? this.phase;
      this.status = detail.status ?? this.status;
      this.step = Number(detail.step ?? this.step);
      this.total = Number(detail.total ?? this.total);
      this.speed = Number(detail.steps_per_s ?? this.speed);
      this.skipped = Number(detail.skipped_steps ?? this.skipped);
      this.output = detail.output ?? this.output;
      this.message = detail.message ?? "";
      for (const [step, loss] of detail.losses ?? []) this.train.add(step, loss);
      if (!detail.losses?.length && detail.phase === "train" && "loss" in detail && Number(detail.step) > 0) {
        this.train.add(detail.step, detail.loss);
      }
      for (const [step, loss] of detail.val_losses ?? []) this.val.add(step, loss);
      this.value = this.header();
    },
    header() {
      if (!this.phase) return "Training: waiting for the first step";
      if (this.status === "reused") return `reused ${this.output || "the output"}: trained before with these settings`;
      if (this.phase === "encode") return `Encoding pairs ${this.step}/${this.total}`;
      const loss = this.train.last ? `  loss ${formatLoss(this.train.last[1])}` : "";
      const speed = this.status === "running" && this.speed > 0 ? `  ${this.speed.toFixed(2)} steps/s` : "";
      const status = FINISHED[this.status] ? `  (${this.status})` : "";
      return `step ${this.step}/${this.total}${loss}${speed}${status}`;
    },
    // Second line: the legend, the last validation loss, and what went wrong so far.
    legend() {
      const items = [{ text: "train", color: COLORS.train }];
      if (this.val.count) items.push({ text: `val ${formatLoss(this.val.last[1])}`, color: COLORS.val });
      const nonFinite = this.train.nonFinite + this.val.nonFinite;
      if (nonFinite) items.push({ text: `non-finite ${nonFinite}`, color: COLORS.bad, tick: true });
      if (this.skipped > 0) items.push({ text: `skipped ${this.skipped}`, color: COLORS.bad, plain: true });
      return items;
    },
    draw(ctx, _node, width, y) {
      const x0 = MARGIN;
      const w = width - 2 * MARGIN;
      const h = CHART_HEIGHT - 8;
      ctx.save();
      ctx.fillStyle = "rgba(0, 0, 0, 0.35)";
      ctx.strokeStyle = "#555";
      ctx.beginPath();
      ctx.rect(x0, y + 2, w, h);
      ctx.fill();
      ctx.stroke();
      ctx.font = FONT;
      ctx.textBaseline = "top";
      ctx.textAlign = "left";
      ctx.fillStyle = this.status === "error" ? TONES.error.text : "#ddd";
      ctx.fillText(this.header(), x0 + 6, y + 6);
      const plot = { x: x0 + 40, y: y + 44, w: w - 50, h: h - 62 };
      if (this.phase === "train" && this.status !== "reused") this.drawLegend(ctx, x0 + 6, y + 24);
      if (this.train.count || this.val.count) this.drawCurves(ctx, plot);
      if (this.total > 0) {
        ctx.fillStyle = "#333";
        ctx.fillRect(x0 + 1, y + h - 3, w - 2, 4);
        ctx.fillStyle = this.status === "error" ? TONES.error.border : "#4caf50";
        ctx.fillRect(x0 + 1, y + h - 3, (w - 2) * Math.min(1, this.step / this.total), 4);
      }
      ctx.restore();
    },
    drawLegend(ctx, x, y) {
      ctx.font = "11px Arial, sans-serif";
      for (const item of this.legend()) {
        ctx.fillStyle = item.color;
        if (item.tick) ctx.fillRect(x + 4, y + 1, 2, 10);
        else if (!item.plain) ctx.fillRect(x, y + 5, 10, 2);
        const textX = item.plain ? x : x + 14;
        ctx.fillStyle = item.plain ? COLORS.bad : "#ccc";
        ctx.fillText(item.text, textX, y);
        x = textX + ctx.measureText(item.text).width + 12;
      }
    },
    drawCurves(ctx, plot) {
      const train = this.train.filled();
      const val = this.val.filled();
      let lo = Math.min(this.train.lo, this.val.lo);
      let hi = Math.max(this.train.hi, this.val.hi);
      if (!Number.isFinite(lo)) [lo, hi] = [0, 1]; // only non-finite values so far
      if (hi - lo < 1e-12) {
        hi += 0.05 * Math.abs(hi || 1);
        lo -= 0.05 * Math.abs(lo || 1);
      }
      const starts = [this.train.first, this.val.first].filter(Boolean).map((p) => p[0]);
      const ends = [this.train.last, this.val.last].filter(Boolean).map((p) => p[0]);
      const first = Math.min(...starts); // two numbers at most
      const lastStep = Math.max(this.total || 0, ...ends, first + 1);
      const px = (s) => plot.x + ((s - first) / Math.max(lastStep - first, 1)) * plot.w;
      const py = (v) => plot.y + plot.h - ((v - lo) / (hi - lo)) * plot.h;
      ctx.strokeStyle = "#444";
      ctx.lineWidth = 1;
      ctx.beginPath();
      ctx.moveTo(plot.x, plot.y);
      ctx.lineTo(plot.x, plot.y + plot.h);
      ctx.lineTo(plot.x + plot.w, plot.y + plot.h);
      ctx.stroke();
      ctx.fillStyle = "#999";
      ctx.font = "10px Arial, sans-serif";
      ctx.textAlign = "right";
      ctx.fillText(hi.toPrecision(3), plot.x - 4, plot.y - 4);
      ctx.fillText(lo.toPrecision(3), plot.x - 4, plot.y + plot.h - 8);
      ctx.textAlign = "left";
      ctx.fillText(String(first), plot.x, plot.y + plot.h + 3);
      ctx.textAlign = "right";
      ctx.fillText(String(lastStep), plot.x + plot.w, plot.y + plot.h + 3);
      const line = (points, style, lineWidth) => {
        ctx.strokeStyle = style;
        ctx.lineWidth = lineWidth;
        ctx.beginPath();
        points.forEach(([s, v], i) => (i ? ctx.lineTo(px(s), py(v)) : ctx.moveTo(px(s), py(v))));
        ctx.stroke();
      };
      const finite = train.filter((b) => b.n);
      // Diffusion losses are noisy: the spread of each bucket and the raw means faint, their moving average bold.
      if (this.train.width > 1) {
        ctx.fillStyle = "rgba(111, 179, 255, 0.18)";
        for (const b of finite) ctx.fillRect(px(b.first), py(b.max), Math.max(1, px(b.last) - px(b.first)), py(b.min) - py(b.max));
      }
      line(finite.map((b) => [b.step, b.sum / b.n]), COLORS.trainFaint, 1);
      line(smooth(finite), COLORS.train, 2);
      const validated = val.filter((b) => b.n);
      line(validated.map((b) => [b.step, b.sum / b.n]), COLORS.val, 2);
      for (const [points, color] of [[finite, COLORS.train], [validated, COLORS.val]]) {
        if (points.length > 24) continue;
        ctx.fillStyle = color;
        for (const b of points) ctx.fillRect(px(b.step) - 2, py(b.sum / b.n) - 2, 4, 4);
      }
      // A non-finite loss is a red tick through the plot at its step, never left out.
      ctx.fillStyle = COLORS.bad;
      for (const b of [...train, ...val]) {
        if (!b.nonFinite) continue;
        const x = Math.round(px(b.step));
        ctx.globalAlpha = 0.45;
        ctx.fillRect(x - 0.5, plot.y, 1, plot.h);
        ctx.globalAlpha = 1;
        ctx.fillRect(x - 1, plot.y - 2, 3, 8);
        ctx.fillRect(x - 1, plot.y + plot.h - 6, 3, 8);
      }
    },
  };
  node.addCustomWidget(widget);
  refresh(node);
  return node.widgets.find((w) => w.name === "ctrlora_loss") ?? widget;
}

// --- Model files the workflow names but the models folder lacks ---------------------------------------------
function checkModelFile(node) {
  const spec = MODEL_WIDGETS[node.comfyClass ?? node.type];
  if (!spec) return;
  const widget = node.widgets?.find((w) => w.name === spec.widget);
  if (!widget) return;
  const available = widget.options?.values ?? [];
  const list = Array.isArray(available) ? available : [];
  const notice = panel(node, "ctrlora_notice");
  if (notice.tone === "error" && notice.text) return; // an error from the last run stays until the next run
  if (!list.length) {
    notice.set(`No CtrLoRA files in ${spec.folder} yet. Put them there, then press R to refresh.\n${DOWNLOAD_HINT}`, "hint");
  } else if (widget.value && !list.includes(widget.value) && widget.value.includes(":")) {
    // '<CtrLoRA-XL base file>:<condition>': a condition built into that base file
    const [file, condition] = [widget.value.slice(0, widget.value.lastIndexOf(":")), widget.value.slice(widget.value.lastIndexOf(":") + 1)];
    notice.set(`Missing condition: no ${file} with a built-in '${condition}' in ${spec.folder}. Put the base there and press R, or pick a condition this list offers.\n${XL_HINT}`, "hint");
  } else if (widget.value && !list.includes(widget.value)) {
    notice.set(`Missing file: this one is not in ${spec.folder}. Download it there, then press R to refresh.\n${DOWNLOAD_HINT}`, "hint");
  } else if (notice.text) {
    notice.set("");
  }
}

// The node a server message names. Inside subgraphs ComfyUI names a node by its path from the root graph ("12:5":
// node 5 of the subgraph that node 12 of the root graph holds), as the frontend's getNodeByExecutionId resolves it.
function nodeById(id) {
  if (id === undefined || id === null) return null;
  let graph = app.rootGraph ?? app.graph;
  let node = null;
  for (const part of String(id).split(":")) {
    if (node) graph = node.subgraph;
    node = graph?.getNodeById(part) ?? graph?.getNodeById(Number(part)) ?? null;
    if (!node) return null;
  }
  return node;
}

function ourNodes() {
  return (app.graph?.nodes ?? []).filter(isOurs);
}

app.registerExtension({
  name: "ctrlora.ui",

  async setup() {
    api.addEventListener(TRAIN_EVENT, ({ detail }) => {
      const node = nodeById(detail?.node);
      if (!node) return;
      const chart = lossChart(node);
      chart.update(detail);
      if (detail.status === "error" && detail.message) panel(node, "ctrlora_notice").set(detail.message, "error");
      redraw(node);
    });

    api.addEventListener(WARNING_EVENT, ({ detail }) => {
      const node = nodeById(detail?.node);
      if (!node || !detail.message) return;
      const notice = panel(node, "ctrlora_notice");
      notice.set(`Warning: ${detail.message}`, "hint");
      notice.fromRun = true;
    });

    api.addEventListener("execution_start", () => {
      // An error or warning of the last run stays until the next run.
      for (const node of ourNodes()) {
        const notice = node.widgets?.find((w) => w.name === "ctrlora_notice");
        if (notice?.tone === "error" || notice?.fromRun) {
          notice.set("");
          notice.fromRun = false;
        }
      }
    });

    api.addEventListener("execution_error", ({ detail }) => {
      if (!String(detail?.node_type ?? "").startsWith("CtrLoRA")) return;
      const node = nodeById(detail.node_id);
      if (!node) return;
      const message = String(detail.exception_message ?? "").trim() || detail.exception_type || "failed";
      panel(node, "ctrlora_notice").set(`Error: ${message}`, "error");
    });
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === LORA_NODE) {
      const onExecuted = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (output) {
        onExecuted?.apply(this, arguments);
        const info = output?.ctrlora_lora?.[0];
        if (info) panel(this, "ctrlora_info").set(describeLora(info), "info");
      };
    }
    if (TRAIN_NODE.test(nodeData.name)) {
      // The run's report (dataset, steps, where the file went) stays on the node.
      const onExecuted = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (output) {
        onExecuted?.apply(this, arguments);
        const report = output?.text?.join("\n");
        if (report) panel(this, "ctrlora_info").set(report, "info");
      };
    }
    if (MODEL_WIDGETS[nodeData.name]) {
      const onConfigure = nodeType.prototype.onConfigure;
      nodeType.prototype.onConfigure = function () {
        const result = onConfigure?.apply(this, arguments);
        checkModelFile(this);
        return result;
      };
    }
  },

  nodeCreated(node) {
    if (TRAIN_NODE.test(node.comfyClass ?? "")) lossChart(node);
    const spec = MODEL_WIDGETS[node.comfyClass];
    if (spec) {
      const widget = node.widgets?.find((w) => w.name === spec.widget);
      if (widget) {
        const callback = widget.callback;
        widget.callback = function () {
          const result = callback?.apply(this, arguments);
          checkModelFile(node);
          return result;
        };
      }
      checkModelFile(node);
    }
  },

  async refreshComboInNodes() {
    for (const node of ourNodes()) checkModelFile(node);
  },
});
