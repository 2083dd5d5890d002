"""The ``prepare`` stage of pretraining: condition folders (the layouts Train CtrLoRA reads) encoded once into
WebDataset shards on disk (``streaming``), so that training reads latents and prompt embeddings instead of images.

Each condition's pairs (as ``dataset.scan`` lists them, in its order) are cut into shards of ``shard_size`` pairs;
shard ``k`` holds pairs ``[k S, (k+1) S)`` less the unreadable ones. Under torchrun process ``r`` of ``W`` encodes the
shards ``k = r, r + W, ...``. A shard is written to a temporary name and published whole, then its sidecar
``shard-000000.json`` (samples, skipped files): a shard with its sidecar is done, so an interrupted prepare run again
continues where it stopped. When every shard exists, process 0 writes ``index.json`` (see ``streaming``).
``prepare.json``, written first, records what the folder is being prepared from: a rerun with another dataset,
resolution or model is refused instead of mixing shards.
"""
import json
import os
import re

import torch

from ..ctrlora_core import CtrLoRAError
from ..ctrlora_core.atomic import write_replace
from .dataset import scan
from .distributed import Distributed
from .encode import EMPTY_PROMPT, PromptCache, encode_pairs, fingerprint
from .loop import check_resolution
from .streaming import EMPTY_PROMPT_FILE, INDEX, array_bytes, read_index, shard_name, write_shard

LABEL = "Pretrain base"
CONDITION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
PREPARE_FILE = "prepare.json"
SHARD_SIZE = 1000  # pairs per shard: ~360 MB at 512 px SD1.5 (latents and a CLIP embedding per pair)


def parse_conditions(specs):
    """``["name=folder", ...]`` (or ``(name, folder)`` pairs) -> ``[(name, folder)]``, checked."""
    conditions = []
    for spec in specs:
        name, folder = spec if isinstance(spec, (tuple, list)) else (spec.partition("=")[0], spec.partition("=")[2])
        name, folder = name.strip(), str(folder).strip()
        if not folder:
            raise CtrLoRAError(f"{LABEL}: condition {spec!r}: write it as name=folder (e.g. canny=/data/canny).")
        if not CONDITION_NAME.match(name):
            raise CtrLoRAError(f"{LABEL}: condition name {name!r}: use letters, digits, '_' and '-' (at most 64).")
        if name in [n for n, _ in conditions]:
            raise CtrLoRAError(f"{LABEL}: condition {name!r} is given twice.")
        conditions.append((name, folder))
    if not conditions:
        raise CtrLoRAError(f"{LABEL}: no condition given (name=folder, one per condition).")
    return conditions


def _write_json(path, document):
    def write(temp):
        with open(temp, "w", encoding="utf-8") as f:
            json.dump(document, f, indent=1)
    write_replace(path, write)


def _write_bytes(path, tensor):
    with open(path, "wb") as f:
        f.write(array_bytes(tensor))


def _sidecar(folder, number):
    """The record of a finished shard (written after the shard itself)."""
    return os.path.join(folder, shard_name(number)[:-len(".tar")] + ".json")


def _unusable(report):
    """The images of a report that could not be decoded (listed as they are found)."""
    return report.skipped["unreadable"] + report.skipped["unsupported"]


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class Preparer:
    """Encodes condition folders into ``data_folder/<condition>/``; ``run()`` returns the report lines."""

    def __init__(self, model, encode_prompt, vae, conditions, data_folder, resolution, template="", name_pattern="",
                 model_name="model", shard_size=SHARD_SIZE, dist=None, log=print):
        self.model, self.encode_prompt, self.vae = model, encode_prompt, vae
        self.conditions = dict(parse_conditions(conditions))
        self.names = sorted(self.conditions)
        self.data_folder = str(data_folder)
        self.resolution, self.template, self.name_pattern = resolution, template, name_pattern
        self.model_name, self.shard_size = model_name, shard_size
        self.dist = dist or Distributed.single()
        self._log = log

    def log(self, message):
        if self.dist.is_writer:
            self._log(f"{LABEL}: {message}")

    def _scan(self):
        """Every condition's pairs, and what its folder is prepared from; refuses a folder prepared from other data."""
        check_resolution(self.model, self.vae, self.resolution, LABEL)
        scanned = {}
        for name in self.names:
            folder = self.conditions[name]
            pairs, report = scan(folder, self.template, self.name_pattern,
                                 label=f"{LABEL}: condition '{name}' ({folder})")
            source = {"folder": os.path.realpath(folder), "pairs": len(pairs), "resolution": self.resolution,
                      "fingerprint": fingerprint(pairs, self.resolution), "model": self.model_name,
                      "template": self.template, "name_pattern": self.name_pattern, "shard_size": self.shard_size}
            path = os.path.join(self.data_folder, name, PREPARE_FILE)
            if os.path.exists(path) and _read_json(path) != source:
                different = [k for k, v in _read_json(path).items() if source.get(k) != v]
                raise CtrLoRAError(
                    f"{LABEL}: {os.path.dirname(path)} holds data prepared from other settings or files "
                    f"({', '.join(different)} differ); choose another data folder, or delete that one to prepare "
                    "it again.")
            scanned[name] = (pairs, report, source, (report.summary(), report.skipped_count))
        return scanned

    def _encode_shard(self, name, pairs, report, number, folder):
        prompts = PromptCache(self.encode_prompt)
        start = number * self.shard_size
        chunk = pairs[start:start + self.shard_size]
        before = len(_unusable(report))
        hints, targets, ids, kept = encode_pairs(chunk, report, self.vae, prompts, self.model.model.latent_format,
                                                 self.resolution)
        skipped = _unusable(report)[before:]
        position = {id(pair): start + i for i, pair in enumerate(chunk)}
        samples = [{"key": f"{position[id(pair)]:09d}", "hint": hints[k], "x0": targets[k],
                    "context": prompts.contexts[int(ids[k])][0], "name": pair.name, "prompt": pair.prompt}
                   for k, pair in enumerate(kept)]
        store_shard(folder, number, samples, skipped)

    def _encode_mine(self, scanned):
        """Encodes this process's shards that are not done yet."""
        with torch.no_grad():
            for name in self.names:
                pairs, report, source, _ = scanned[name]
                folder = os.path.join(self.data_folder, name)
                os.makedirs(folder, exist_ok=True)
                if self.dist.is_writer:
                    _write_json(os.path.join(folder, PREPARE_FILE), source)
                    empty = self.encode_prompt(EMPTY_PROMPT)[0]
                    write_replace(os.path.join(folder, EMPTY_PROMPT_FILE), lambda temp: _write_bytes(temp, empty))
                count = -(-len(pairs) // self.shard_size)
                mine = [k for k in range(self.dist.rank, count, self.dist.world)
                        if not os.path.exists(_sidecar(folder, k))]
                if mine:
                    self._log(f"{LABEL}: process {self.dist.rank}: encoding {len(mine)} shard(s) of '{name}' "
                              f"({len(pairs)} pairs in {count} shards)")
                for number in mine:
                    self._encode_shard(name, pairs, report, number, folder)

    def _write_index(self, scanned):
        lines = []
        for name in self.names:
            pairs, _, source, (scan_summary, scan_skipped) = scanned[name]
            count = -(-len(pairs) // self.shard_size)
            line = write_index(os.path.join(self.data_folder, name), name, count, source, scan_summary)
            lines.append(line + (f"; {scan_skipped} files skipped while scanning" if scan_skipped else ""))
        return lines

    def run(self):
        scanned = self.dist.exchange(self._scan)
        self.dist.exchange(lambda: self._encode_mine(scanned))
        lines = self.dist.exchange(lambda: self._write_index(scanned) if self.dist.is_writer else None)
        lines = self.dist.gather(lines)[0]
        self.log(f"prepared {self.data_folder}: " + "; ".join(lines))
        return lines


def store_shard(folder, number, samples, skipped=()):
    """Shard ``number`` of a condition (see ``streaming.write_shard``), published whole, then its sidecar: a shard
    with a sidecar is done."""
    shard = os.path.join(folder, shard_name(number))
    write_replace(shard, lambda temp: write_shard(temp, samples))
    shapes = {"latent_shape": list(samples[0]["x0"].shape), "context_dim": samples[0]["context"].shape[-1]} \
        if samples else {}
    _write_json(_sidecar(folder, number), {"nsamples": len(samples), "skipped": list(skipped),
                                           "bytes": os.path.getsize(shard), **shapes})


def write_index(folder, name, count, source, scan_summary=""):
    """``index.json`` of a condition whose ``count`` shards are all written; returns a line for the report."""
    shards = [_read_json(_sidecar(folder, k)) for k in range(count)]
    skipped = [item for shard in shards for item in shard["skipped"]]
    samples = sum(s["nsamples"] for s in shards)
    if not samples:
        raise CtrLoRAError(f"{LABEL}: condition '{name}' ({source['folder']}): no pair could be read "
                           f"({len(skipped)} unreadable).")
    first = next(s for s in shards if s["nsamples"])
    shapes = {(tuple(s["latent_shape"]), s["context_dim"]) for s in shards if s["nsamples"]}
    if len(shapes) > 1:
        raise CtrLoRAError(f"{LABEL}: the shards of '{name}' in {folder} hold latents or prompt embeddings of "
                           f"different shapes {sorted(shapes)}; delete that folder and prepare it again.")
    index = {
        "wids_version": 1, "name": name,
        "shardlist": [{"url": shard_name(k), "nsamples": s["nsamples"], "filesize": s["bytes"]}
                      for k, s in enumerate(shards) if s["nsamples"]],
        "ctrlora": {**source, "samples": samples, "unreadable": skipped, "report": scan_summary,
                    "latent_shape": first["latent_shape"], "context_dim": first["context_dim"]},
    }
    _write_json(os.path.join(folder, INDEX), index)
    size = sum(s["bytes"] for s in shards)
    return (f"{name}: {samples} pairs in {len(index['shardlist'])} shard(s), {size / 2**20:.1f} MiB"
            + (f", {len(skipped)} unreadable skipped" if skipped else ""))


def prepared_conditions(data_folder):
    """``{condition: folder}`` of every prepared condition under ``data_folder``."""
    if not os.path.isdir(data_folder):
        raise CtrLoRAError(f"{LABEL}: the data folder {data_folder} does not exist; run 'pretrain_base.py prepare' "
                           "first.")
    found = {entry: os.path.join(data_folder, entry) for entry in sorted(os.listdir(data_folder))
             if os.path.isfile(os.path.join(data_folder, entry, INDEX))}
    if not found:
        raise CtrLoRAError(f"{LABEL}: {data_folder} holds no prepared condition (no */{INDEX}); run "
                           "'pretrain_base.py prepare' for it first.")
    for folder in found.values():
        read_index(folder, LABEL)
    return found
