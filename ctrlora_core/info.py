"""What a condition LoRA file is, in a few facts for the UI: condition, rank, number of keys, size, training.

The condition comes from the official file name ``ctrlora_sd15_<basecn>_<condition>[_rank<r>][_<imgs>_<steps>]``
(e.g. ``ctrlora_sd15_basecn700k_lineart_rank128_1kimgs_1ksteps.ckpt``); any other name is the condition itself.
A ``.safetensors`` file written by the pack's trainer also records its steps and dataset size in its metadata.
A released file is looked up in the catalogue: what it was trained on, its recommended strength, and which node
makes the condition image it expects; any other file shows what its own metadata says.
"""
import os
import re

import safetensors

from . import catalogue

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
    released = catalogue.released_file(path)
    if released and released["kind"] == "lora":
        info["released"] = (f"released {released['set']}-condition LoRA, {released['training']}; "
                            f"recommended strength {released['strength']}")
    elif metadata:
        info["metadata"] = _shown_metadata(metadata)
    expects = catalogue.how_to_make(metadata.get("condition") or parsed["condition"])
    if expects:
        info["expects"] = expects
    return info


SHOWN_METADATA = ("condition", "preprocessor", "base", "resolution", "prompt_template", "trainer")


def _shown_metadata(metadata, longest=120):
    """The metadata entries a user can act on (short values only), for files the catalogue does not know."""
    keys = [k for k in SHOWN_METADATA if k in metadata] or sorted(metadata)[:6]
    return {k: str(metadata[k]) for k in keys if len(str(metadata[k])) <= longest}
