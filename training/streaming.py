"""Prepared pretraining data on disk: WebDataset tar shards, read by index with ``wids`` through a torch DataLoader.

Why WebDataset: plain POSIX tar files (``tar -tf`` lists them; any WebDataset pipeline streams them), written and
read by small pure-Python packages (``webdataset``, ``wids``: numpy, pyyaml and braceexpand, nothing that pins
torch), and ``wids`` reads a sample by its index (memory-mapped local shards, a few open at a time; remote shards
are fetched to a local cache). Indexed reads are what keep each step's samples a pure function of the seed: the plan
(``sharding``) names the pairs, the DataLoader workers read just those. MosaicML Streaming and litdata index too but
bring a cloud-storage stack and torch pins with them.

A condition's folder holds ``shard-000000.tar``, ... (one sample per pair: ``<key>.hint.npy``, ``<key>.x0.npy``,
``<key>.context.npy`` float32 arrays, ``<key>.json`` name and prompt), ``empty_prompt.npy`` (the prompt-dropout
embedding) and ``index.json``: a ``wids`` dataset description (``wids_version``, ``shardlist`` of ``{url,
nsamples}``) with the pack's own ``ctrlora`` entry (fingerprint, resolution, latent shape, report).
"""
import contextlib
import io
import json
import math
import os
import sys

import numpy as np
import torch

from ..ctrlora_core import CtrLoRAError

INDEX = "index.json"
EMPTY_PROMPT_FILE = "empty_prompt.npy"
ARRAYS = ("hint", "x0", "context")


def shard_name(number):
    return f"shard-{number:06d}.tar"


def array_bytes(tensor):
    buffer = io.BytesIO()
    np.save(buffer, tensor.detach().to("cpu", torch.float32).contiguous().numpy())
    return buffer.getvalue()


def array_from_stream(stream):
    return torch.from_numpy(np.load(stream))


def write_shard(path, samples):
    """A tar shard of ``samples`` (dicts with ``key``, ``hint``, ``x0``, ``context``, ``name``, ``prompt``)."""
    import webdataset

    with open(path, "wb") as stream:
        writer = webdataset.TarWriter(stream, encoder=False)
        for sample in samples:
            record = {"__key__": sample["key"], "json": json.dumps({"name": sample["name"],
                                                                    "prompt": sample["prompt"]}).encode()}
            record.update({f"{k}.npy": array_bytes(sample[k]) for k in ARRAYS})
            writer.write(record)
        writer.close()


def read_index(folder, label):
    path = os.path.join(folder, INDEX)
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
        index["ctrlora"]["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CtrLoRAError(f"{label}: {folder} is not prepared pretraining data ({INDEX} unreadable: {e}); run "
                           "'pretrain_base.py prepare' for it first.") from e
    return index


class SameOrCached:
    """``wids`` local name of a shard: a local file is read in place, anything else goes to ``cache_dir``."""

    def __init__(self, cache_dir):
        self.cache_dir = cache_dir

    def __call__(self, url):
        if "://" not in url or url.startswith("file://"):
            return url[len("file://"):] if url.startswith("file://") else url
        os.makedirs(self.cache_dir, exist_ok=True)
        return os.path.join(self.cache_dir, url.replace("://", "_").replace("/", "_"))


class StreamedPairs(torch.utils.data.Dataset):
    """Every prepared condition, read by ``(condition, pair index)``; shards are opened lazily in each DataLoader
    worker and at most ``open_shards`` stay mapped per condition, so memory does not grow with the data."""

    def __init__(self, folders, label, open_shards=4, cache_dir=None):
        self.folders = dict(folders)
        self.label = label
        self.indexes = {name: read_index(folder, label) for name, folder in self.folders.items()}
        self.open_shards = open_shards
        self.cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "ctrlora-shards")
        self.readers = {}
        self.empty_prompts = {name: torch.from_numpy(np.load(os.path.join(folder, EMPTY_PROMPT_FILE)))
                              for name, folder in self.folders.items()}

    def sizes(self):
        return {name: sum(s["nsamples"] for s in index["shardlist"]) for name, index in self.indexes.items()}

    def info(self, name):
        return self.indexes[name]["ctrlora"]

    def _reader(self, name):
        if name not in self.readers:
            import wids

            folder = self.folders[name]
            shards = [{**s, "url": s["url"] if "://" in s["url"] else os.path.join(folder, s["url"])}
                      for s in self.indexes[name]["shardlist"]]
            with contextlib.redirect_stderr(io.StringIO()):  # wids prints a summary of every dataset it opens
                self.readers[name] = wids.ShardListDataset(shards, lru_size=self.open_shards, transformations=[],
                                                           localname=SameOrCached(self.cache_dir))
            self.readers[name].check_cache_misses = lambda: None  # the plan's draws are random by design
        return self.readers[name]

    def __getitem__(self, key):
        name, index = key
        try:
            sample = self._reader(name)[index]
        except Exception as e:  # a shard removed, truncated or changed since it was prepared
            raise CtrLoRAError(f"{self.label}: cannot read pair {index} of '{name}' from {self.folders[name]} "
                               f"({type(e).__name__}: {e}); prepare that condition again.") from e
        return name, {k: array_from_stream(sample[f".{k}.npy"]) for k in ARRAYS}

    def __getstate__(self):  # workers open their own shards
        return {**self.__dict__, "readers": {}}


class PlanBatches(torch.utils.data.Sampler):
    """The micro-batches one process computes, from update ``start`` to ``end``: lists of ``(condition, index)``."""

    def __init__(self, plan, micro_batches, start, end):
        self.plan, self.micro_batches, self.start, self.end = plan, micro_batches, start, end

    def __iter__(self):
        for step in range(self.start, self.end):
            for j in self.micro_batches:
                name, items = self.plan.items(step, j)
                yield [(name, i) for i in items]

    def __len__(self):
        return (self.end - self.start) * len(self.micro_batches)


def collate(samples):
    """``(condition, {hint, x0: stacked, context: list})`` of one micro-batch (one condition)."""
    name = samples[0][0]
    tensors = [s[1] for s in samples]
    return name, {"hint": torch.stack([t["hint"] for t in tensors]), "x0": torch.stack([t["x0"] for t in tensors]),
                  "context": [t["context"] for t in tensors]}


def context_batch(contexts, device, dtype):
    """Prompt embeddings ``[tokens, dim]`` of different lengths as one batch, each repeated to their least common
    multiple, as ComfyUI batches conditionings."""
    length = math.lcm(*(c.shape[0] for c in contexts))
    return torch.stack([c.repeat(length // c.shape[0], 1) for c in contexts]).to(device, dtype)


def loader(dataset, plan, micro_batches, start, end, workers):
    """The DataLoader of one process's micro-batches from update ``start`` on (``workers`` reader processes)."""
    extra = {"prefetch_factor": 4, "persistent_workers": False} if workers else {}
    if workers and sys.platform.startswith("linux"):
        extra["multiprocessing_context"] = "fork"
    return torch.utils.data.DataLoader(dataset, batch_sampler=PlanBatches(plan, micro_batches, start, end),
                                       collate_fn=collate, num_workers=workers, **extra)
