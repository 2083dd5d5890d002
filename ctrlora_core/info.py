"""What a condition LoRA file is, in a few facts for the UI: condition, rank, number of keys, size, training.

The condition comes from the official file name ``ctrlora_sd15_<basecn>_<condition>[_rank<r>][_<imgs>_<steps>]``
(e.g. ``ctrlora_sd15_basecn700k_lineart_rank128_1kimgs_1ksteps.ckpt``); any other name is the condition itself.
A ``.safetensors`` file written by the pack's trainer also records its steps and dataset size in its metadata.
"""
import os
import re

import safetensors

OFFICIAL_NAME = re.compile(
    r"^ctrlora_sd\d+_(?P<base>[^_]+)_(?P<condition>.+?)(?:_rank(?P<rank>\d+))?"
    r"(?:_(?P<images>\d+k?)imgs_(?P<steps>\d+k?)steps)?$"
)


def parse_name(file_name):
    """``{"condition", "base", "images", "steps"}`` from a file name (the last three None when not official)."""
    stem = os.path.splitext(os.path.basename(file_name))[0]
    match = OFFICIAL_NAME.match(stem)
    if not match:
        return {"condition": stem, "base": None, "images": None, "steps": None}
    return {k: match.group(k) for k in ("condition", "base", "images", "steps")}


def _trainer_metadata(path):
    if not path.endswith(".safetensors"):
        return {}
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except Exception:  # the file loaded already; its metadata is only a nicety
        return {}


def describe_lora(path, rank, num_keys):
    """A JSON-ready description of the LoRA file at ``path`` (already loaded, with ``rank`` and ``num_keys``)."""
    parsed = parse_name(path)
    info = {
        "file": os.path.basename(path),
        "condition": parsed["condition"],
        "rank": int(rank),
        "keys": int(num_keys),
        "size_bytes": os.path.getsize(path),
    }
    trained = ""
    if parsed["images"] and parsed["steps"]:
        trained = f"{parsed['images']} images, {parsed['steps']} steps"
    metadata = _trainer_metadata(path)
    if metadata.get("steps"):
        trained = f"{metadata['steps']} steps" + (
            f" on {metadata['dataset_size']} pairs" if metadata.get("dataset_size") else "")
    if trained:
        info["trained"] = trained
    return info
