"""Training pairs from a folder: the official ``prompt.json`` layout or ``source/`` + ``target/`` matched by name.

Layouts (``folder`` is the dataset root):

* official: ``prompt.json`` with one JSON object per line, ``{"source": "source/0000.jpg", "target":
  "target/0000.jpg", "prompt": "..."}``; paths are relative to the root and may not leave it.
  In either layout, files, captions and links must stay inside the root: links leading out are skipped and
  counted, naming only the link.
* paired: ``source/<stem>.<ext>`` and ``target/<stem>.<ext>`` with the same stem; an optional caption
  ``<stem>.txt`` next to the target (or the source).

Prompts: a non-empty template wins, filled from the file name (``upper_front_0012`` gives the template's named
fields, in their order of first appearance, the values ``upper``, ``front``, ...; or a file-name pattern such as
``{jaw}_{view}_{index}`` names them explicitly). ``{name}`` is the whole stem and ``{caption}`` the item's caption.
With an empty template the caption is the prompt (``prompt.json``'s ``prompt``, or the ``.txt`` file).

Everything that cannot be used is skipped and counted in a ``DatasetReport``. Images are decoded to 8-bit RGB as the
official loader (OpenCV) does, in any mode (see ``images.py``), then resized (short side) and centre-cropped to the
training resolution.
"""
import dataclasses
import json
import logging
import os
import re
import string

import numpy as np
import torch
from PIL import Image

from ..ctrlora_core import CtrLoRAError
from .paths import inside
from .images import UnsupportedImage, decode

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
CAPTION_EXTENSION = ".txt"
PROMPT_FILE = "prompt.json"
RESERVED_FIELDS = ("name", "caption")

# Skip reasons, in report order.
SKIP_REASONS = {
    "unpaired": "files without a partner of the same name in the other folder",
    "not_image": "files that are not images",
    "unreadable": "unreadable or corrupt images",
    "unsupported": "images without a defined 8-bit conversion",
    "outside": "prompt.json paths outside the dataset folder",
    "link_outside": "files or captions that are links leading outside the dataset folder",
    "missing": "prompt.json paths to missing files",
    "bad_line": "prompt.json lines that are not a {source, target, prompt} object",
    "duplicate": "images with the same name as another (first one kept)",
    "name_mismatch": "files whose names do not fit the prompt template / file-name pattern",
}


@dataclasses.dataclass(frozen=True)
class Pair:
    source: str  # absolute paths
    target: str
    prompt: str
    name: str  # the target's path relative to the dataset root, for reports and fingerprints


@dataclasses.dataclass
class DatasetReport:
    folder: str
    layout: str = ""
    skipped: dict = dataclasses.field(default_factory=lambda: {k: [] for k in SKIP_REASONS})
    used: int = 0
    prompts_from: dict = dataclasses.field(default_factory=dict)

    def skip(self, reason, item):
        self.skipped[reason].append(item)

    @property
    def skipped_count(self):
        return sum(len(v) for v in self.skipped.values())

    def summary(self):
        lines = [f"Dataset {self.folder} ({self.layout} layout): {self.used} pairs used, "
                 f"{self.skipped_count} skipped."]
        for reason, items in self.skipped.items():
            if items:
                examples = ", ".join(items[:3]) + (" ..." if len(items) > 3 else "")
                lines.append(f"  skipped {len(items)} {SKIP_REASONS[reason]}: {examples}")
        if self.prompts_from:
            lines.append("  prompts: " + ", ".join(f"{n} from {k}" for k, n in sorted(self.prompts_from.items())))
        return "\n".join(lines)


class PromptTemplate:
    """A ``str.format`` template whose fields come from the file name (or its caption)."""

    def __init__(self, template, name_pattern=""):
        self.template = (template or "").strip()
        self.fields = self._fields(self.template, "prompt template")
        self.pattern = None
        if name_pattern and name_pattern.strip():
            pattern_fields = self._fields(name_pattern.strip(), "file-name pattern")
            unknown = [f for f in self.fields if f not in pattern_fields and f not in RESERVED_FIELDS]
            if unknown:
                raise CtrLoRAError(f"Prompt template: field(s) {', '.join('{' + f + '}' for f in unknown)} are not "
                                   f"in the file-name pattern '{name_pattern}'.")
            regex = ""
            for literal, field, _, _ in string.Formatter().parse(name_pattern.strip()):
                regex += re.escape(literal)
                if field is not None:
                    regex += f"(?P<{field}>.+?)"
            self.pattern = re.compile(regex + "$")

    @staticmethod
    def _fields(text, what):
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as e:
            raise CtrLoRAError(f"The {what} '{text}' is not valid: {e} (use {{field}}; write {{{{ for a brace).") from e
        fields = []
        for _, field, _, _ in parsed:
            if field is None:
                continue
            if not field.isidentifier():
                raise CtrLoRAError(f"The {what} '{text}': '{{{field}}}' is not a field name (letters, digits, _).")
            if field not in fields:
                fields.append(field)
        return fields

    @property
    def active(self):
        return bool(self.template)

    def fill(self, stem, caption):
        """The prompt for a file ``stem``; None when the name does not fit the template."""
        values = {"name": stem}
        if caption is not None:
            values["caption"] = caption
        named = [f for f in self.fields if f not in RESERVED_FIELDS]
        if self.pattern is not None:
            match = self.pattern.match(stem)
            if match is None:
                return None
            values.update(match.groupdict())
        elif named:
            parts = stem.split("_")
            if len(parts) < len(named):
                return None
            values.update(zip(named, parts))
        if any(f not in values for f in self.fields):
            return None
        return self.template.format_map(values)


def _is_image(path):
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _read_caption(root, report, *candidates):
    for path in candidates:
        if not os.path.isfile(path):
            continue
        if not inside(root, os.path.realpath(path)):
            report.skip("link_outside", os.path.relpath(path, root))
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    return None


def _choose_prompt(template, stem, caption, report):
    if template.active:
        prompt = template.fill(stem, caption)
        if prompt is not None:
            report.prompts_from["template"] = report.prompts_from.get("template", 0) + 1
        return prompt
    key = "captions" if caption is not None else "nothing (empty prompt)"
    report.prompts_from[key] = report.prompts_from.get(key, 0) + 1
    return caption or ""


def _scan_prompt_json(root, template, report):
    pairs = []
    with open(os.path.join(root, PROMPT_FILE), encoding="utf-8", errors="replace") as f:
        lines = f.readlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            source, target = item["source"], item["target"]
            caption = item.get("prompt")
            if not isinstance(source, str) or not isinstance(target, str) or not (caption is None or isinstance(caption, str)):
                raise TypeError("source/target/prompt must be strings")
        except (ValueError, KeyError, TypeError, AttributeError):
            report.skip("bad_line", f"line {number}")
            continue
        paths = []
        for key, rel in (("source", source), ("target", target)):
            path = os.path.realpath(os.path.join(root, rel))
            if os.path.isabs(rel) or not inside(root, path):
                report.skip("outside", f"line {number} ({key})")  # nothing about what lies outside
            elif not os.path.isfile(path):
                report.skip("missing", rel)
            elif not _is_image(path):
                report.skip("not_image", rel)
            else:
                paths.append(path)
        if len(paths) != 2:
            continue
        stem = os.path.splitext(os.path.basename(target))[0]
        prompt = _choose_prompt(template, stem, caption, report)
        if prompt is None:
            report.skip("name_mismatch", target)
            continue
        pairs.append(Pair(paths[0], paths[1], prompt, os.path.relpath(paths[1], root)))
    return pairs


def _images_by_stem(root, label, report):
    images = {}
    folder = os.path.join(root, label)
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if not os.path.isfile(path) or entry.lower().endswith(CAPTION_EXTENSION):
            continue
        stem = os.path.splitext(entry)[0]
        if not inside(root, os.path.realpath(path)):
            report.skip("link_outside", f"{label}/{entry}")
        elif not _is_image(entry):
            report.skip("not_image", f"{label}/{entry}")
        elif stem in images:
            report.skip("duplicate", f"{label}/{entry}")
        else:
            images[stem] = path
    return images


def _scan_paired(root, template, report):
    sources = _images_by_stem(root, "source", report)
    targets = _images_by_stem(root, "target", report)
    for stem in sorted(set(sources) ^ set(targets)):
        report.skip("unpaired", f"{'source' if stem in sources else 'target'}/{os.path.basename((sources | targets)[stem])}")
    pairs = []
    for stem in sorted(set(sources) & set(targets)):
        caption = _read_caption(root, report, os.path.join(root, "target", stem + CAPTION_EXTENSION),
                                os.path.join(root, "source", stem + CAPTION_EXTENSION))
        prompt = _choose_prompt(template, stem, caption, report)
        if prompt is None:
            report.skip("name_mismatch", f"target/{os.path.basename(targets[stem])}")
            continue
        pairs.append(Pair(sources[stem], targets[stem], prompt, os.path.relpath(targets[stem], root)))
    return pairs


def scan(folder, template="", name_pattern="", label="Train CtrLoRA"):
    """Lists the usable pairs of ``folder``. Returns ``(pairs, report)``; no image is decoded yet. ``label`` starts
    the error messages (the caller and, where it has several, which folder)."""
    template = PromptTemplate(template, name_pattern)
    if not folder or not str(folder).strip():
        raise CtrLoRAError(f"{label}: no dataset folder given.")
    root = os.path.realpath(os.path.expanduser(str(folder).strip()))
    if not os.path.isdir(root):
        raise CtrLoRAError(f"{label}: the dataset folder {folder} does not exist or is not a folder.")
    report = DatasetReport(folder=root)
    prompt_file = os.path.join(root, PROMPT_FILE)
    if os.path.lexists(prompt_file) and not inside(root, os.path.realpath(prompt_file)):
        raise CtrLoRAError(f"{label}: {PROMPT_FILE} in {root} is a link that leads outside the dataset folder; "
                           f"put the file itself there.")
    if os.path.isfile(prompt_file):
        report.layout = "prompt.json"
        pairs = _scan_prompt_json(root, template, report)
    elif os.path.isdir(os.path.join(root, "source")) and os.path.isdir(os.path.join(root, "target")):
        report.layout = "source/target"
        pairs = _scan_paired(root, template, report)
    else:
        raise CtrLoRAError(
            f"{label}: {root} is not a dataset folder: it needs either {PROMPT_FILE} (one JSON object per line: "
            "source, target, prompt) or the subfolders source/ and target/ with images of the same names."
        )
    if not pairs:
        raise CtrLoRAError(f"{label}: no usable condition/target pairs.\n{report.summary()}")
    report.used = len(pairs)  # until decoding finds unreadable ones
    return pairs, report


def load_image(path, resolution):
    """An image as a ComfyUI IMAGE row ``[resolution, resolution, 3]`` in [0, 1], decoded to 8-bit RGB as the
    official loader does (``images.decode``); the short side is resized to ``resolution``, then the centre is
    cropped. Raises ``OSError``/``ValueError`` for unusable files."""
    image = Image.fromarray(decode(path))
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if size != image.size:
        image = image.resize(size, Image.LANCZOS)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)


def load_pair(pair, resolution, report):
    """``(condition, target)`` images of a pair, or None (counted as unreadable or unsupported) if either cannot be
    used."""
    images = []
    for path in (pair.source, pair.target):
        try:
            images.append(load_image(path, resolution))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            logging.warning("Train CtrLoRA: skipping %s: %s", path, e)
            item = os.path.relpath(path, report.folder)
            if isinstance(e, UnsupportedImage):
                report.skip("unsupported", f"{item} ({e})")
            else:
                report.skip("unreadable", item)
            return None
    return images
