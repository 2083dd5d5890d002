"""The learning-rate schedule: the official constant rate by default, optionally linear warm-up and cosine decay.

A pure function of the step, so a resumed run continues the same schedule without saving any scheduler state.
"""
import math

SCHEDULES = ("constant", "cosine")


def lr_factor(step, total, warmup=0, schedule="constant"):
    """Multiplier of the base learning rate for optimizer step ``step`` (1-based) of ``total``."""
    if warmup and step <= warmup:
        return step / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr
