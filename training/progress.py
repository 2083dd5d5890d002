"""What a run shows in ComfyUI: the node's progress bar, the loss as text and as a custom event, and cancel.

Events: ``ctrlora.train.progress`` (``server.PromptServer.instance.send_sync``) with ``{"node", "prompt_id", "output",
"phase", "status", "step", "total", "loss", "losses": [[step, loss], ...], "val_losses": [[step, loss], ...],
"skipped_steps", "steps_per_s", "message"}``. ``losses`` and ``val_losses`` hold the points since the previous event
(events are sent at most every ``min_interval`` seconds, and always for the last step), so a client that
concatenates them has the whole curves; a non-finite loss is sent as null (JSON has no NaN) for the chart to mark.
``status``: running, done, cancelled, error, or reused (the output existed from the same run and was loaded).
Previews go through the node's progress bar (ComfyUI shows them on the node). Without a running server nothing is
sent.
"""
import logging
import math
import sys
import time

import numpy as np
from PIL import Image

import comfy.model_management
import comfy.utils

EVENT = "ctrlora.train.progress"
PREVIEW_MAX_SIZE = 512


def _json_number(value):
    return value if math.isfinite(value) else None


def executing_node():
    """(prompt_id, node_id) of the node ComfyUI is running now, where this ComfyUI tells."""
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        return None, None
    context = get_executing_context()
    return (context.prompt_id, context.node_id) if context is not None else (None, None)


def prompt_server():
    server = sys.modules.get("server")  # only a running ComfyUI has imported it
    return getattr(getattr(server, "PromptServer", None), "instance", None)


class ComfyReporter:
    def __init__(self, node_id=None, output="", min_interval=0.25, log_every_s=10.0):
        self.prompt_id, running = executing_node()
        self.node_id = node_id if node_id is not None else running
        self.output = output
        self.min_interval = min_interval
        self.log_every_s = log_every_s
        self.bar = None
        self.pending = []
        self.pending_validation = []
        self.last_sent = 0.0
        self.last_logged = 0.0
        self.started = None
        self.start_step = 0

    # --- ComfyUI mechanisms -------------------------------------------------------------------------------------
    def check_cancel(self):
        comfy.model_management.throw_exception_if_processing_interrupted()

    def _progress(self, value, total, preview=None):
        if self.bar is None or self.bar.total != total:
            self.bar = comfy.utils.ProgressBar(total, node_id=self.node_id)
        self.bar.update_absolute(value, total, preview)

    def _send(self, data):
        server = prompt_server()
        if server is None:
            return
        try:
            server.send_sync(EVENT, {"node": self.node_id, "prompt_id": self.prompt_id, "output": self.output, **data})
        except Exception as e:  # a UI event must never stop a training run
            logging.debug("Train CtrLoRA: progress event not sent: %s", e)

    def _text(self, text):
        server = prompt_server()
        if server is None or self.node_id is None or not hasattr(server, "send_progress_text"):
            return
        try:
            server.send_progress_text(text, self.node_id)
        except Exception as e:
            logging.debug("Train CtrLoRA: progress text not sent: %s", e)

    # --- what the loop reports ----------------------------------------------------------------------------------
    def encoding(self, done, total):
        self._progress(done, total)
        self._text(f"encoding pairs {done}/{total}")
        self._send({"phase": "encode", "status": "running", "step": done, "total": total})

    def start(self, step, total):
        self.started = time.monotonic()
        self.start_step = step
        self.last_logged = self.started
        self._progress(step, total)
        self._send({"phase": "train", "status": "running", "step": step, "total": total, "losses": []})

    def step(self, step, total, loss, validation=None, skipped=0):
        """A finished step (or, with a non-finite ``loss``, the step that failed)."""
        now = time.monotonic()
        self.pending.append([step, _json_number(loss)])
        if validation is not None:
            self.pending_validation.append([step, _json_number(validation)])
        self._progress(step, total)
        speed = (step - self.start_step) / max(now - self.started, 1e-9)
        failed = not math.isfinite(loss)
        if failed or now - self.last_sent >= self.min_interval or step == total or validation is not None:
            self._send({"phase": "train", "status": "running", "step": step, "total": total,
                        "loss": _json_number(loss), "losses": self.pending, "val_losses": self.pending_validation,
                        "skipped_steps": skipped, "steps_per_s": speed})
            shown = f"step {step}/{total}  loss {loss:.4f}" + (f"  held-out {validation:.4f}" if validation is not None else "")
            self._text(shown + f"  {speed:.2f} steps/s" + (f"  {skipped} skipped" if skipped else ""))
            self.pending, self.pending_validation = [], []
            self.last_sent = now
        if now - self.last_logged >= self.log_every_s or step == total:
            logging.info("Train CtrLoRA %s: step %d/%d, loss %.5f, %.2f steps/s", self.output, step, total, loss, speed)
            self.last_logged = now

    def preview(self, step, total, image):
        """Shows ``image`` ([H, W, 3] in [0, 1]) on the node, as ComfyUI shows a sampler's previews."""
        picture = Image.fromarray((image.clamp(0, 1).numpy() * 255).round().astype(np.uint8))
        self._progress(step, total, ("PNG", picture, PREVIEW_MAX_SIZE))

    def finished(self, status, step, total, message=""):
        """``status``: done, cancelled, error or reused."""
        self._send({"phase": "train", "status": status, "step": step, "total": total, "losses": self.pending,
                    "val_losses": self.pending_validation, "message": message})
        self.pending, self.pending_validation = [], []
        self._text(f"{status} at step {step}/{total}" + (f": {message}" if message else ""))
