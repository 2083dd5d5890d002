"""Where a run writes, and the resumable training state.

``models/ctrlora/<name>.safetensors``: the finished LoRA (official key layout, written once, never overwritten).
``models/ctrlora/<name>.train/``: the run's folder:

* ``state.json`` + ``state-<step>.tensors``: everything a resume needs: the step, the condition's tensors, AdamW's
  moments, the RNG and the data order (tensors as safetensors; scalars, config and the loss history as JSON). The
  tensors file has no model-file extension so that model lists do not offer it. Each save writes a new tensors file,
  then replaces ``state.json`` atomically, then removes older tensors files: a crash at any point leaves a
  consistent state.
* ``<name>_step000500.safetensors``: intermediate LoRA files (every ``save_every`` steps and when a run stops), which
  'Load CtrLoRA' lists as ``<name>.train/<name>_step000500.safetensors``.
"""
import glob
import json
import math
import os
import re

import safetensors.torch
import torch

from ..ctrlora_core import CtrLoRAError
from ..ctrlora_core.atomic import write_replace
from ..ctrlora_core.checkpoint import save_lora_file

STATE_VERSION = 1
LORA_EXTENSION = ".safetensors"
# Settings that define the run: a resume with other values would not continue the same run.
RUN_DEFINING = ("rank", "batch_size", "grad_accum", "lr", "prompt_dropout", "resolution", "base", "start_from",
                "weight_decay", "precision", "lr_schedule", "warmup_steps", "schedule_steps", "validation_fraction")
# Settings that only change what a run shows or keeps, not the weights it ends with.
NOT_WEIGHT_DEFINING = ("save_every", "keep_snapshots", "validate_every", "gradient_checkpointing")


# Characters that leave the folder, or that exFAT, FAT32, SMB or Windows refuse in a file name.
NAME_FORBIDDEN = '/\\:*?"<>|'
# Windows device names: "NUL.safetensors" would not be a file there.
RESERVED_NAMES = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
# Room for the longest name derived from it (<name>_step000500.safetensors) within the usual 255-byte limit.
NAME_MAX_BYTES = 200


def output_paths(folder, name, label="Train CtrLoRA"):
    """``(lora_path, run_folder)`` for an output ``name``; refuses names that would leave ``folder`` or that some
    filesystem could not store."""
    raw = name
    name = (name or "").strip()
    if name.endswith(LORA_EXTENSION):
        name = name[:-len(LORA_EXTENSION)]
    if not name:
        raise CtrLoRAError(f"{label}: the output name is empty.")
    if any(c in NAME_FORBIDDEN or ord(c) < 32 for c in name) or ".." in name or name.startswith(".") or \
            (os.altsep and os.altsep in name) or name.split(".")[0].upper() in RESERVED_NAMES:
        raise CtrLoRAError(f"{label}: the output name {raw!r} must be a plain file name (no folders, '..', "
                           f"leading '.', device names or any of {NAME_FORBIDDEN} ); it is saved in {folder}.")
    if len(name.encode("utf-8")) > NAME_MAX_BYTES:
        raise CtrLoRAError(f"{label}: the output name is {len(name.encode('utf-8'))} bytes long; "
                           f"use at most {NAME_MAX_BYTES}.")
    return os.path.join(folder, name + LORA_EXTENSION), os.path.join(folder, name + ".train")


def check_new_output(path, label="Train CtrLoRA"):
    if os.path.lexists(path):  # a link, even a broken one, is a file that is never replaced
        raise CtrLoRAError(f"{label}: {os.path.basename(path)} already exists in {os.path.dirname(path)}; "
                           "choose another output name (existing files are never overwritten).")


def _write_json(path, document):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(document, f)


def _to_json(value, finite=False):
    """``value`` with tensors as numbers; with ``finite``, non-finite numbers as None (strict JSON has no NaN)."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if finite and isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_to_json(v, finite) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v, finite) for k, v in value.items()}
    return value


def optimizer_entries(optimizer):
    """An optimizer's state as ``(tensors, document)``: tensors under ``optimizer.<index>.<key>``, scalars and the
    param groups as JSON (see ``restore_optimizer``)."""
    tensors, scalars = {}, {}
    optim = optimizer.state_dict()
    for index, values in optim["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                tensors[f"optimizer.{index}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{index}.{key}"] = _to_json(value)
    return tensors, {"param_groups": _to_json(optim["param_groups"]), "scalars": scalars}


def write_state(run_folder, step, tensors, document):
    """Writes a resumable state at ``step`` atomically: the tensors file first, then ``state.json`` (which names
    it), then older tensors files are removed; a crash at any point leaves a consistent state."""
    name = f"state-{step:08d}.tensors"
    write_replace(os.path.join(run_folder, name), lambda p: safetensors.torch.save_file(tensors, p))
    document = {"version": STATE_VERSION, "step": step, "tensors": name, **document}
    write_replace(os.path.join(run_folder, "state.json"), lambda p: _write_json(p, document))
    for old in glob.glob(os.path.join(run_folder, "state-*.tensors")):
        if os.path.basename(old) != name:
            os.unlink(old)


def save_state(run_folder, step, config, adapter, optimizer, rng, updater=None, losses=(), extra=None):
    """Writes the resumable state of a run at a step boundary (atomic, see the module doc). ``updater``: the
    ``precision.Updater`` state (loss scaler, skipped steps)."""
    tensors = {f"adapter.{n}": t.detach().to("cpu", torch.float32).contiguous()
               for n, t in zip(adapter.names, adapter.tensors)}
    optimizer_tensors, optimizer_document = optimizer_entries(optimizer)
    tensors.update(optimizer_tensors)
    tensors["rng.generator"] = rng["generator"].contiguous()
    tensors["rng.order"] = rng["order"].contiguous()
    write_state(run_folder, step, tensors, {
        "config": config, "rank": adapter.rank, "names": list(adapter.names), "optimizer": optimizer_document,
        "rng": {"cursor": rng["cursor"], "epoch": rng["epoch"]},
        "updater": _to_json(updater or {}),
        "losses": [list(x) for x in losses], **(extra or {}),
    })


def has_state(run_folder):
    return os.path.isfile(os.path.join(run_folder, "state.json"))


def load_state(run_folder, label="Train CtrLoRA"):
    """``(document, tensors)`` of a saved run; ``label`` starts the error messages."""
    path = os.path.join(run_folder, "state.json")
    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
        tensors = safetensors.torch.load_file(os.path.join(run_folder, document["tensors"]))
    except (OSError, ValueError, KeyError) as e:
        raise CtrLoRAError(f"{label}: the saved run in {run_folder} cannot be read ({e}); remove that folder "
                           "to start over, or choose another output name.") from e
    if document.get("version") != STATE_VERSION:
        raise CtrLoRAError(f"{label}: the saved run in {run_folder} has state version "
                           f"{document.get('version')}, this pack reads {STATE_VERSION}.")
    return document, tensors


def check_resumable(document, config, run_folder, keys=RUN_DEFINING, label="Train CtrLoRA"):
    """Refuses a resume whose settings (``keys`` of the run's config) would not continue the saved run."""
    saved = document["config"]
    different = [f"{k}: saved {saved.get(k)!r}, now {config.get(k)!r}"
                 for k in keys if saved.get(k) != config.get(k)]
    if different:
        raise CtrLoRAError(
            f"{label}: resume: these settings differ from the saved run in "
            f"{run_folder} (set them back to continue it, or turn resume off and pick another output name): "
            + "; ".join(different)
        )


def restore_optimizer(optimizer, document, tensors):
    state = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in document["optimizer"]["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = torch.tensor(value, dtype=torch.float32)
    groups = document["optimizer"]["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_snapshot(run_folder, stem, step, tensors, metadata):
    """An intermediate LoRA file for ``step``; kept if that step was saved before (same run, same weights)."""
    path = os.path.join(run_folder, f"{stem}_step{step:06d}{LORA_EXTENSION}")
    if not os.path.exists(path):
        save_lora_file(tensors, path, metadata)
    return path


def snapshots(run_folder):
    pattern = re.compile(r"_step(\d+)\.safetensors$")
    found = sorted(glob.glob(os.path.join(run_folder, "*_step*.safetensors")))
    return [p for p in found if pattern.search(p)]


def remove_state(run_folder):
    """Drops the resumable state of a finished run (the intermediate LoRA files stay)."""
    for path in glob.glob(os.path.join(run_folder, "state-*.tensors")) + [os.path.join(run_folder, "state.json")]:
        if os.path.exists(path):
            os.unlink(path)


def prune_snapshots(run_folder, count, keep=None):
    """Removes all but the newest ``count`` intermediate LoRA files (never ``keep``, the one just written)."""
    found = snapshots(run_folder)
    excess = [p for p in found if p != keep][:max(0, len(found) - count)]
    for path in excess:
        os.unlink(path)


def disk_usage(folder):
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder) for f in files)


def to_json_text(value):
    """A value as JSON text for a safetensors metadata field (non-finite numbers as null)."""
    return json.dumps(_to_json(value, finite=True))


def from_json_text(text):
    try:
        return json.loads(text) if text else []
    except ValueError:
        return []


def reuse_output(path, run_config, fingerprint, label="Train CtrLoRA"):
    """Whether an existing output is this very run, finished: returns its metadata when its settings, base and
    dataset match ``run_config`` and ``fingerprint``; otherwise says what differs (the file is never replaced)."""
    name = os.path.basename(path)
    try:
        with safetensors.safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:
        raise CtrLoRAError(f"{label}: {name} already exists in {os.path.dirname(path)} and cannot be read ({e}); "
                           "choose another output name (existing files are never overwritten).") from e
    saved = from_json_text(metadata.get("train_config"))
    if not isinstance(saved, dict) or not saved:
        raise CtrLoRAError(f"{label}: {name} already exists in {os.path.dirname(path)} and was not written by Train "
                           "CtrLoRA; choose another output name (existing files are never overwritten).")
    now = json.loads(to_json_text(run_config))
    different = [f"{k}: {saved.get(k)!r} then, {now.get(k)!r} now" for k in sorted(set(saved) | set(now))
                 if k not in NOT_WEIGHT_DEFINING and saved.get(k) != now.get(k)]
    if metadata.get("dataset_fingerprint") != fingerprint:
        different.append("dataset: other files, prompts or resolution")
    if different:
        raise CtrLoRAError(
            f"{label}: {name} already exists from a run with other settings ({'; '.join(different)}). Choose a new "
            f"output_name to train again (start_from={name} continues from its weights), or set the settings back "
            "to load it without training.")
    return metadata
