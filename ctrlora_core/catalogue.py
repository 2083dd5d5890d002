"""The released CtrLoRA files and the condition image each expects (catalogue.json, one table for the pack).

Each file: name, condition, base or novel condition, training images/steps, recommended strength, its path on the
authors' model page and how its facts were verified. Each condition: the official preprocessor and the ComfyUI
node(s) that make its input.
"""
import functools
import json
import os

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "catalogue.json")


@functools.lru_cache(maxsize=None)
def catalogue():
    with open(PATH, encoding="utf-8") as f:
        return json.load(f)


def released_file(file_name):
    """The catalogue entry of a released file (by its base name), or None for any other file."""
    name = os.path.basename(file_name)
    return next((entry for entry in catalogue()["files"] if entry["file"] == name), None)


def how_to_make(condition):
    """'<condition>: use <node(s)>' for a known condition, else None."""
    known = catalogue()["conditions"].get(condition)
    return f"{condition}: use {known['make']}" if known else None


def download_url(entry):
    """Where the file downloads from (its page's ``resolve/main/<path>``), or None where its path is not known."""
    if not entry["path"]:
        return None
    return f"{entry.get('page', catalogue()['page'])}/resolve/main/{entry['path']}"
