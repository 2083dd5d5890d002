// CtrLoRA in the ComfyUI page: what a loaded LoRA file is, the training loss curve, and inline messages.
//
// * Load CtrLoRA: once it has run, the node shows the file's condition, rank, key count and size
//   (its UI output "ctrlora_lora").
// * Training: the loss curve and step counter are drawn on the training node from the
//   "ctrlora.train.progress" events the node sends while it runs; its report stays on it afterwards.
// * Messages on the node itself: an error raised by one of the pack's nodes, and a model file the
//   workflow names that is not in the models folder (with where to put it).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TRAIN_EVENT = "ctrlora.train.progress";
const LORA_NODE = "CtrLoRALoad";
const TRAIN_NODE = /^CtrLoRATrain/;
const MODEL_WIDGETS = {
  CtrLoRALoadBase: { widget: "base_name", folder: "models/ctrlora/ (or models/controlnet/)" },
  CtrLoRALoad: { widget: "lora_name", folder: "models/ctrlora/" },
};
const DOWNLOAD_HINT = "Released files: huggingface.co/xyfJASON/ctrlora";
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
  return parts.join("\n");
}

// --- Training: loss curve and step counter ------------------------------------------------------------------
const CHART_HEIGHT = 150;

// Exponential moving average over about a twentieth of the points (at least 5).
function smooth(points) {
  const alpha = 2 / (Math.max(5, points.length / 20) + 1);
  let average = points[0]?.[1];
  return points.map(([step, loss]) => {
    average = alpha * loss + (1 - alpha) * average;
    return [step, average];
  });
}

function lossChart(node) {
  const existing = node.widgets?.find((w) => w.name === "ctrlora_loss");
  if (existing) return existing;
  const widget = {
    name: "ctrlora_loss",
    type: "ctrlora_loss",
    value: "",
    serialize: false,
    options: { serialize: false },
    points: [],
    step: 0,
    total: 0,
    phase: "",
    status: "",
    speed: 0,
    message: "",
    run: null,
    computeSize(width) {
      return [width, CHART_HEIGHT];
    },
    reset(run) {
      Object.assign(this, { points: [], step: 0, total: 0, phase: "", status: "", speed: 0, message: "", run });
    },
    update(detail) {
      if (detail.prompt_id && detail.prompt_id !== this.run) this.reset(detail.prompt_id);
      if (detail.phase === "train" && detail.status === "running" && Number(detail.step) < this.step) this.reset(this.run);
      this.phase = detail.phase ?? this.phase;
      this.status = detail.status ?? this.status;
      this.step = Number(detail.step ?? this.step);
      this.total = Number(detail.total ?? this.total);
      this.speed = Number(detail.steps_per_s ?? this.speed);
      this.message = detail.message ?? "";
      for (const point of detail.losses ?? []) {
        const [step, loss] = point;
        if (Number.isFinite(loss) && !this.points.some((p) => p[0] === step)) this.points.push([step, loss]);
      }
      if (!detail.losses?.length && Number.isFinite(detail.loss) && !this.points.some((p) => p[0] === detail.step)) {
        this.points.push([detail.step, detail.loss]);
      }
      this.points.sort((a, b) => a[0] - b[0]);
      this.value = this.header();
    },
    header() {
      if (!this.phase) return "Training: waiting for the first step";
      if (this.phase === "encode") return `Encoding pairs ${this.step}/${this.total}`;
      const last = this.points[this.points.length - 1];
      const loss = last ? `  loss ${last[1].toFixed(4)}` : "";
      const speed = this.status === "running" && this.speed > 0 ? `  ${this.speed.toFixed(2)} steps/s` : "";
      const status = this.status && this.status !== "running" ? `  (${this.status})` : "";
      return `step ${this.step}/${this.total}${loss}${speed}${status}`;
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
      const plot = { x: x0 + 40, y: y + 26, w: w - 50, h: h - 44 };
      if (this.points.length) {
        const losses = this.points.map((p) => p[1]);
        let lo = Math.min(...losses);
        let hi = Math.max(...losses);
        if (hi - lo < 1e-12) {
          hi += 0.5 * Math.abs(hi || 1) * 0.1;
          lo -= 0.5 * Math.abs(lo || 1) * 0.1;
        }
        const first = this.points[0][0];
        const lastStep = Math.max(this.total || 0, this.points[this.points.length - 1][0], first + 1);
        const px = (s) => plot.x + ((s - first) / Math.max(lastStep - first, 1)) * plot.w;
        const py = (v) => plot.y + plot.h - ((v - lo) / (hi - lo)) * plot.h;
        ctx.strokeStyle = "#444";
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
        const line = (points, style, width) => {
          ctx.strokeStyle = style;
          ctx.lineWidth = width;
          ctx.beginPath();
          points.forEach(([s, v], i) => (i ? ctx.lineTo(px(s), py(v)) : ctx.moveTo(px(s), py(v))));
          ctx.stroke();
        };
        // Diffusion losses are noisy: the raw values faint, their moving average bold.
        line(this.points, "rgba(111, 179, 255, 0.35)", 1);
        line(smooth(this.points), "#6fb3ff", 2);
        if (this.points.length === 1) {
          ctx.fillStyle = "#6fb3ff";
          ctx.fillRect(px(this.points[0][0]) - 2, py(this.points[0][1]) - 2, 4, 4);
        }
      }
      if (this.total > 0) {
        ctx.fillStyle = "#333";
        ctx.fillRect(x0 + 1, y + h - 3, w - 2, 4);
        ctx.fillStyle = this.status === "error" ? TONES.error.border : "#4caf50";
        ctx.fillRect(x0 + 1, y + h - 3, (w - 2) * Math.min(1, this.step / this.total), 4);
      }
      ctx.restore();
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
  } else if (widget.value && !list.includes(widget.value)) {
    notice.set(`Missing file: this one is not in ${spec.folder}. Download it there, then press R to refresh.\n${DOWNLOAD_HINT}`, "hint");
  } else if (notice.text) {
    notice.set("");
  }
}

function nodeById(id) {
  if (id === undefined || id === null) return null;
  return app.graph?.getNodeById(id) ?? app.graph?.getNodeById(Number(id)) ?? null;
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
      node.setDirtyCanvas?.(true, true);
      app.graph.setDirtyCanvas(true, true);
    });

    api.addEventListener("execution_start", () => {
      for (const node of ourNodes()) {
        const notice = node.widgets?.find((w) => w.name === "ctrlora_notice");
        if (notice?.tone === "error") notice.set("");
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
