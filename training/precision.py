"""Mixed precision for training, shared by Train CtrLoRA and pretraining: which dtype a step computes in, when its
loss is scaled, and how a step that went wrong fails.

Rules:

* The trained tensors (LoRA, zero convs, ``middle_block_out``, norms) are fp32 masters. They enter the forward as
  they are and autocast casts them per op to the compute dtype, so AdamW's ~1e-5 updates are never rounded to a
  half-precision grid (a norm weight near 1.0 stored in fp16 only moves in steps of 2^-10).
* The compute dtype follows the models': ComfyUI already keeps the UNet and the base in the dtype it computes with on
  this device (fp16 on most GPUs and on Apple MPS). Computing in that dtype means frozen weights are never recast at
  each op; a precision other than theirs is allowed but recasts them (a note says so).
* The loss is scaled (GradScaler) whenever fp16 is anywhere in the trained path: the autocast dtype, or a model that
  computes in fp16 (the backward runs through the frozen fp16 UNet). fp16 is never trained unscaled.
"""
import contextlib
import dataclasses
import math

import torch

from ..ctrlora_core import CtrLoRAError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_NAMES = {v: k for k, v in PRECISIONS.items()}
# Consecutive loss-scaler skips after which the gradients are taken to be broken, not just too large: the scale has
# been halved this often (from 65536 down to far below 1).
MAX_CONSECUTIVE_SKIPS = 40


def dtype_name(dtype):
    return _NAMES.get(dtype, str(dtype).replace("torch.", ""))


@dataclasses.dataclass(frozen=True)
class Precision:
    device_type: str
    compute: torch.dtype  # what the trained path computes in
    scaled: bool  # loss scaling (fp16 somewhere in the forward or backward)
    note: str = ""  # a cost the user should know of (weights recast at each op)

    def autocast(self):
        if self.compute == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.compute)

    def describe(self):
        text = dtype_name(self.compute) + (" autocast" if self.compute != torch.float32 else "")
        return text + (" with loss scaling" if self.scaled else "")


def choose_precision(setting, device, model_dtypes, label):
    """The ``Precision`` of a run.

    ``setting``: "auto" or a key of ``PRECISIONS``; ``model_dtypes``: the dtypes the frozen models compute in (the
    UNet's and the base's, as ComfyUI loaded them). "auto" computes in the models' half dtype where they have one;
    with fp32 models, bf16 (or fp16) on CUDA and fp32 elsewhere.
    """
    halves = [d for d in model_dtypes if d != torch.float32]
    if setting == "auto":
        if halves:
            compute = halves[0]
        elif device.type == "cuda":
            compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            compute = torch.float32
    elif setting in PRECISIONS:
        compute = PRECISIONS[setting]
    else:
        raise CtrLoRAError(f"{label}: precision must be auto, {', '.join(PRECISIONS)} (got {setting!r}).")
    if compute == torch.float32 and halves:
        raise CtrLoRAError(
            f"{label}: precision fp32, but ComfyUI loaded the models in {dtype_name(halves[0])} on this device. "
            "Start ComfyUI with --fp32-unet to train in fp32, or set precision to auto.")
    others = sorted({dtype_name(d) for d in halves if d != compute})
    note = (f"models stored in {', '.join(others)} are recast to {dtype_name(compute)} at every op; start ComfyUI "
            f"with --{dtype_name(compute)}-unet to avoid it") if others else ""
    scaled = compute == torch.float16 or torch.float16 in model_dtypes
    return Precision(device.type, compute, scaled, note)


class Updater:
    """Scaled backward and optimizer step of one run, with its failure rules.

    A non-finite loss ends the run (``check_loss``); a step whose scaled gradients overflow is skipped by the scaler
    and counted; ``MAX_CONSECUTIVE_SKIPS`` skips in a row, or a run whose steps were all skipped, is an error.
    """

    def __init__(self, precision, optimizer, label, advice):
        self.precision = precision
        self.optimizer = optimizer
        self.label = label
        self.advice = advice  # what to try, in the words of this trainer's settings
        self.scaler = torch.amp.GradScaler(precision.device_type) if precision.scaled else None
        self.skipped = 0
        self.consecutive_skips = 0
        self.applied = 0

    def autocast(self):
        return self.precision.autocast()

    def backward(self, loss, divide=1):
        scaled = loss / divide
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()

    def check_loss(self, value, step):
        if not math.isfinite(value):
            raise CtrLoRAError(f"{self.label}: the loss became {value} at step {step} ({self.precision.describe()}); "
                               f"the run stopped there and keeps its last save. Try {self.advice}.")

    def step(self, step):
        """Applies the gradients (unless the scaler skips them); returns True when the weights changed."""
        if self.scaler is None:
            self.optimizer.step()
            applied = True
        else:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            applied = self.scaler.get_scale() >= scale  # the scaler lowers the scale exactly when it skips
        self.optimizer.zero_grad(set_to_none=False)
        if applied:
            self.applied += 1
            self.consecutive_skips = 0
            return True
        self.skipped += 1
        self.consecutive_skips += 1
        if self.consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
            raise CtrLoRAError(
                f"{self.label}: the gradients were not finite for {self.consecutive_skips} steps in a row (up to step "
                f"{step}, loss scale now {self.scaler.get_scale():g}); no weights changed in those steps. "
                f"Try {self.advice}.")
        return False

    def check_finished(self):
        if self.scaler is not None and self.applied == 0 and self.skipped:
            raise CtrLoRAError(f"{self.label}: every one of the {self.skipped} steps was skipped by the loss scaler "
                               f"(non-finite gradients); nothing was learnt. Try {self.advice}.")

    def state(self):
        return {"scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "skipped": self.skipped, "applied": self.applied}

    def load_state(self, document):
        if self.scaler is not None and document.get("scaler"):
            self.scaler.load_state_dict(document["scaler"])
        self.skipped = document.get("skipped", 0)
        self.applied = document.get("applied", 0)
