"""What a pretraining run writes, and its resumable state (Train CtrLoRA's ``state`` helpers underneath).

Outputs, in the official layouts (``control_model.*`` keys, ``.safetensors``, written through ``save_lora_file``:
fsynced, published whole, never overwritten, with metadata): ``<name>.safetensors``, the base (shared weights +
zero convs + norms, and one set of ``lora_layer`` keys, those of the first condition, as released bases carry them
and some loaders require); and ``<name>_<condition>_rank<r>.safetensors`` per condition: its LoRA plus the shared
zero convs, ``middle_block_out`` and norms (the official ``extract_lora`` layout, 246 keys at SD1.5 size), which
'Load CtrLoRA' loads directly.

``<name>.train/`` holds the resumable state (``state.json`` + tensors, written by process 0, replaced atomically)
and a snapshot of the outputs per save (``step000500/``), of which the newest ``keep`` stay.
"""
import json
import os
import re
import shutil

from ..ctrlora_core import CtrLoRAError
from ..ctrlora_core.checkpoint import save_lora_file
from . import state as run_state
from .pretrain_data import LABEL

SNAPSHOT = re.compile(r"^step(\d{6,})$")


def _bytes(tensors):
    return sum(t.numel() * 4 for t in tensors.values())  # written as float32


def _gib(count):
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


class RunFiles:
    def __init__(self, output_folder, name, conditions, rank, is_writer=True):
        self.output_folder = str(output_folder)
        self.base_path, self.run_folder = run_state.output_paths(self.output_folder, name, LABEL)
        self.stem = os.path.basename(self.base_path)[:-len(run_state.LORA_EXTENSION)]
        self.names = list(conditions)
        self.rank = rank
        self.is_writer = is_writer

    def lora_name(self, condition):
        return f"{self.stem}_{condition}_rank{self.rank}{run_state.LORA_EXTENSION}"

    def output_files(self, folder):
        return os.path.join(folder, os.path.basename(self.base_path)), \
            {c: os.path.join(folder, self.lora_name(c)) for c in self.names}

    # --- before training -------------------------------------------------------------------------------------------
    def saved_run(self, resume, config, fingerprints, keys):
        """``(document, tensors)`` of the saved run to continue, or None; refuses one that would not continue."""
        if not run_state.has_state(self.run_folder):
            return None
        if not resume:
            raise CtrLoRAError(
                f"{LABEL}: a saved run of '{self.stem}' exists in {self.run_folder}. Resume it (--resume), or choose "
                "another output name (or delete that folder to start over).")
        document, tensors = run_state.load_state(self.run_folder, LABEL)
        if document.get("kind") != "pretrain":
            raise CtrLoRAError(f"{LABEL}: {self.run_folder} holds a run of another kind; choose another output name.")
        saved = {c["name"]: c for c in document["conditions"]}
        unknown = [c for c in self.names if c not in saved]
        missing = [c for c in saved if c not in self.names]
        if unknown or missing:
            problems = ([f"unknown condition(s) {', '.join(unknown)}"] if unknown else []) + \
                ([f"condition(s) {', '.join(missing)} of the saved run not in the data"] if missing else [])
            raise CtrLoRAError(
                f"{LABEL}: resume: {'; '.join(problems)}. The saved run in {self.run_folder} trains "
                f"{', '.join(saved)}: give a data folder with exactly these conditions to continue it.")
        run_state.check_resumable(document, config, self.run_folder, keys, LABEL)
        changed = [n for n in self.names if saved[n]["fingerprint"] != fingerprints[n]]
        if changed:
            raise CtrLoRAError(
                f"{LABEL}: resume: the data of condition(s) {', '.join(changed)} differs from the saved run's "
                f"(prepared from other files, prompts or resolution); prepare it as it was to continue.")
        return document, tensors

    def check_outputs(self, saved):
        base_path, lora_paths = self.output_files(self.output_folder)
        for path in [base_path, *lora_paths.values()]:
            run_state.check_new_output(path, LABEL)
        if saved is None and os.path.isdir(self.run_folder) and os.listdir(self.run_folder):
            raise CtrLoRAError(
                f"{LABEL}: {self.run_folder} holds files of an earlier run of '{self.stem}' but no state to resume; "
                "choose another output name, or move that folder away (nothing is overwritten).")

    def disk_estimate(self, base, loras, optimizer, config):
        """What the run will hold on disk at most, said at the start."""
        outputs = _bytes(base) + sum(_bytes(t) for t in loras.values())
        state = 3 * sum(p.numel() * 4 for group in optimizer.param_groups for p in group["params"])  # + AdamW moments
        saves = config.steps // config.save_every if config.save_every else 0
        snapshots = min(saves, config.keep_snapshots)
        total = 2 * state + snapshots * outputs + outputs  # the state briefly twice while a new one is written
        return (f"disk: outputs {_gib(outputs)}, state {_gib(state)} (twice while saving), {snapshots} snapshot(s) "
                f"kept of {_gib(outputs)} each: up to {_gib(total)} in {self.output_folder}")

    # --- writing ---------------------------------------------------------------------------------------------------
    def _metadata(self, metadata, kind, condition=None):
        document = {"ctrlora_format": kind, **metadata, "dataset_sizes": json.dumps(metadata["dataset_sizes"])}
        if kind == "base":
            document["lora_layer_keys_from"] = self.names[0]
        else:
            document.update(condition=condition, base=os.path.basename(self.base_path),
                            dataset_size=metadata["dataset_sizes"][condition])
        return document

    def write_outputs(self, folder, base, loras, metadata):
        """The base and every condition's LoRA in ``folder`` (existing files are kept: same run, same step)."""
        base_path, lora_paths = self.output_files(folder)
        for path, tensors, document in [(base_path, base, self._metadata(metadata, "base"))] + \
                [(lora_paths[n], loras[n], self._metadata(metadata, "lora", n)) for n in self.names]:
            if not os.path.exists(path):
                save_lora_file(tensors, path, document)
        return base_path, lora_paths

    def restore_optimizer(self, optimizer, document, tensors):
        run_state.restore_optimizer(optimizer, document, tensors)

    def save(self, step, tensors, optimizer, document, base, loras, metadata, keep):
        """The resumable state at ``step`` (atomic), then a snapshot of the outputs; older snapshots beyond the
        newest ``keep`` are removed. Returns the snapshot's paths."""
        optimizer_tensors, optimizer_document = run_state.optimizer_entries(optimizer)
        run_state.write_state(self.run_folder, step, {**tensors, **optimizer_tensors},
                              {**document, "optimizer": optimizer_document})
        snapshot = os.path.join(self.run_folder, f"step{step:06d}")
        paths = self.write_outputs(snapshot, base, loras, metadata)
        self.prune_snapshots(keep)
        return paths if keep else None

    def prune_snapshots(self, keep):
        found = sorted(e for e in os.listdir(self.run_folder) if SNAPSHOT.match(e))
        for entry in found[:max(0, len(found) - keep)]:
            shutil.rmtree(os.path.join(self.run_folder, entry))

    def finish(self, base, loras, metadata):
        """The outputs; then the state goes (the kept snapshots stay)."""
        paths = self.write_outputs(self.output_folder, base, loras, metadata)
        run_state.remove_state(self.run_folder)
        if os.path.isdir(self.run_folder) and not os.listdir(self.run_folder):
            os.rmdir(self.run_folder)
        return paths
