"""Pretraining a Base ControlNet on several conditions at once (CtrLoRA's first stage), on one process or many.

What the official pretraining does (``cldm/cldm_ctrlora_pretrain.py``, ``scripts/train_ctrlora_pretrain.py``,
``configs/ctrlora_pretrain_sd15_9tasks_rank128.yaml``), and this module follows:

* The ControlNet starts as a copy of the SD UNet's encoder and middle block, without ``input_hint_block`` (the
  VAE-encoded hint enters ``input_blocks.0``); its zero convs and ``middle_block_out`` start at zero.
* Each condition ("task") has its own LoRA on every ``nn.Linear`` (rank r, no alpha, down ~ N(0, 1/r), up = 0):
  the LoRAs are the only per-condition modules. The base weights, the zero convs, ``middle_block_out`` and all
  norms are shared by every condition and trained with the LoRAs; that is why a released base file carries zero
  convs and norms, which a new condition's LoRA copies as its starting point.
* One AdamW (lr 1e-5, torch's default weight decay 0.01) over every ControlNet parameter; the SD UNet, VAE and
  CLIP stay frozen; noise-prediction MSE; prompts dropped to "" with probability 0.3.
* Each batch comes from one condition; conditions are interleaved in rounds (each round visits every condition
  once, in a shuffled order). See ``sharding`` for the plan, which is the same on any number of processes.
* The official run's torch 1.13 ``zero_grad()`` keeps zero gradients: once a condition's LoRA has been trained,
  it takes an AdamW step with a zero gradient in the steps of the other conditions (its moments decay and weight
  decay applies). This module does the same.

Where the official code differs and this module does not follow: the latents and prompt embeddings are encoded
once (posterior mode, as at inference) instead of at every step, and the processes of a run train the same
condition in a step (the official sampler shuffles the task order in each process separately, unseeded).

Outputs, in the official layouts (``control_model.*`` keys, ``.safetensors``, written atomically, never
overwritten, with metadata): ``<name>.safetensors``, the base (shared weights + zero convs + norms, and one set of
``lora_layer`` keys, those of the first condition, as released bases carry them and some loaders require); and
``<name>_<condition>_rank<r>.safetensors`` per condition: its LoRA plus the shared zero convs, ``middle_block_out``
and norms (the official ``extract_lora`` layout, 246 keys at SD1.5 size), which 'Load CtrLoRA' loads directly.
``<name>.train/`` holds the resumable state (``state.json`` + tensors, written by process 0) and a snapshot of the
outputs per save (``step000500/``).
"""
import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import json
import logging
import math
import os
import re
import sys
import time

import torch

import comfy.model_management

from ..ctrlora_core import Condition, ConditionAdapter, CtrLoRAError
from ..ctrlora_core.base import base_from_tensors, load_base
from ..ctrlora_core.checkpoint import save_lora_file
from ..ctrlora_core.lora import binding_names
from . import state as run_state
from .checkpointing import checkpoint_targets, gradient_checkpointing
from .dataset import scan
from .distributed import Distributed
from .encode import (EMPTY_PROMPT, EncodedDataset, PromptCache, check_prompt_widths, clip_prompt_encoder,
                     encode_pairs, fingerprint)
from .loop import PRECISIONS, TrainConfig, Trainer, check_resolution, prepare_frozen
from .objective import NoisePrediction
from .sharding import Plan, generator, positions

LABEL = "Pretrain base"
TRAINER = "comfyui-ctrlora pretrain_base"
ENCODER_PARTS = ("time_embed", "input_blocks", "middle_block")
CONDITION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
# Settings that define a run: a resume with other values would not continue the same run.
RUN_DEFINING = ("rank", "global_batch", "lr", "prompt_dropout", "resolution", "seed", "weight_decay", "precision",
                "model", "template", "name_pattern")


def _unlabelled(error):
    """A message of the training issue's code without its 'Train CtrLoRA: ' start."""
    return str(error).replace("Train CtrLoRA: ", "", 1)


@dataclasses.dataclass
class PretrainConfig(TrainConfig):
    """The training issue's settings (same ranges and precision choice), with pretraining defaults."""
    steps: int = 10000
    batch_size: int = 4  # per process (official: 4 per GPU); the global batch is this times the processes
    save_every: int = 1000
    stop_after: int = 0  # > 0: save the state and stop at this step (continue later with resume)

    def validate(self):
        problems = []
        try:
            super().validate()
        except CtrLoRAError as e:
            problems.append(_unlabelled(e).rstrip("."))
        if self.grad_accum != 1:
            problems.append(f"gradient accumulation is not supported here (got {self.grad_accum}); raise the batch "
                            "size or the number of processes")
        if self.stop_after < 0:
            problems.append(f"stop_after must be 0 (run to the end) or more (got {self.stop_after})")
        if problems:
            raise CtrLoRAError(f"{LABEL}: " + "; ".join(problems) + ".")


@dataclasses.dataclass
class PretrainResult:
    status: str  # "done" or "stopped" (at stop_after; resume to continue)
    step: int
    base_path: str  # the output files ("done") or the latest snapshot's ("stopped")
    lora_paths: dict
    losses: list  # (step, condition, loss of the global batch)
    report: str


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


def encoder_tensors(unet):
    """The UNet's encoder and middle block: what a new base ControlNet starts from (keys as in the base)."""
    if getattr(unet, "label_emb", None) is not None:
        raise CtrLoRAError(f"{LABEL}: the model has a class/ADM embedding (an SDXL-like UNet); a CtrLoRA base copies "
                           "an SD1.5-family UNet.")
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in unet.state_dict().items()
            if k.split(".")[0] in ENCODER_PARTS}


def check_base_fits(base, unet):
    """The base must be a copy of this UNet's encoder: same blocks, same shapes."""
    expected = {k: tuple(v.shape) for k, v in unet.state_dict().items() if k.split(".")[0] in ENCODER_PARTS}
    actual = {k: tuple(v.shape) for k, v in base.model.state_dict().items() if k.split(".")[0] in ENCODER_PARTS}
    wrong = [f"{k} {actual[k]} (the model's UNet has {expected[k]})" for k in actual
             if k in expected and actual[k] != expected[k]]
    missing = [k for k in expected if k not in actual]
    if wrong or missing:
        detail = "; ".join(wrong[:2] + [f"missing {k}" for k in missing[:2]])
        raise CtrLoRAError(f"{LABEL}: {base.name} does not fit the model (a base for another model size?): {detail}.")


def lora_adapter(model, rank, name, seed):
    """A condition's LoRA for pretraining (official init), seeded by (seed, name): LoRA layers only, the zero
    convs and norms are the base's own."""
    fresh = ConditionAdapter.fresh(model, rank, generator(seed, "lora", name))
    return ConditionAdapter({n: t for n, t in zip(fresh.names, fresh.tensors) if n.endswith(("lora_down", "lora_up"))},
                            rank)


class PretrainModel(torch.nn.Module):
    """What DistributedDataParallel wraps: the base and every condition's LoRA; forward is one condition's loss."""

    def __init__(self, base, adapters, objective):
        super().__init__()
        self.control = base.model
        self.loras = torch.nn.ModuleDict(adapters)
        self.conditions = {name: Condition(base, adapter, name) for name, adapter in adapters.items()}
        self.objective = objective

    def forward(self, name, batch):
        return self.objective.loss(self.conditions[name], **batch)


class Pretrainer:
    """One pretraining run; ``run()`` returns only after process 0 wrote the outputs (or the state, when stopped)."""

    def __init__(self, model, encode_prompt, vae, conditions, output_folder, name, config, template="",
                 name_pattern="", init_base=None, resume=False, dist=None, model_name="model", log=None):
        self.model, self.encode_prompt, self.vae = model, encode_prompt, vae
        self.conditions = dict(parse_conditions(conditions))
        self.names = sorted(self.conditions)
        self.config = config
        self.template, self.name_pattern = template, name_pattern
        self.init_base = init_base
        self.resume = resume
        self.dist = dist or Distributed.single()
        self.model_name = model_name
        self._log = log or logging.info
        self.output_folder = str(output_folder)
        self.base_path, self.run_folder = run_state.output_paths(self.output_folder, name, LABEL)
        self.stem = os.path.basename(self.base_path)[:-len(run_state.LORA_EXTENSION)]
        self.global_batch = config.batch_size * self.dist.world
        self.positions = positions(self.dist.rank, self.dist.world, self.global_batch)
        self.step = 0
        self.losses = []
        self.notes = []
        self.in_update = False

    def log(self, message):
        if self.dist.is_writer:
            self._log(f"{LABEL}: {message}")

    # --- files -------------------------------------------------------------------------------------------------------
    def lora_name(self, condition):
        return f"{self.stem}_{condition}_rank{self.config.rank}{run_state.LORA_EXTENSION}"

    def output_files(self, folder):
        return os.path.join(folder, os.path.basename(self.base_path)), \
            {c: os.path.join(folder, self.lora_name(c)) for c in self.names}

    def run_config(self):
        return {**dataclasses.asdict(self.config), "global_batch": self.global_batch, "model": self.model_name,
                "template": self.template, "name_pattern": self.name_pattern,
                "init": os.path.basename(self.init_base) if self.init_base else f"{self.model_name} (UNet encoder)"}

    # --- setup -------------------------------------------------------------------------------------------------------
    def _saved_run(self):
        if not run_state.has_state(self.run_folder):
            if self.resume:
                self.notes.append(f"no saved run in {self.run_folder}: started a new one")
            return None
        if not self.resume:
            raise CtrLoRAError(
                f"{LABEL}: a saved run of '{self.stem}' exists in {self.run_folder}. Resume it (--resume), or choose "
                "another output name (or delete that folder to start over).")
        document, tensors = run_state.load_state(self.run_folder, LABEL)
        if document.get("kind") != "pretrain":
            raise CtrLoRAError(f"{LABEL}: {self.run_folder} holds a run of another kind; choose another output name.")
        saved = [c["name"] for c in document["conditions"]]
        unknown = [c for c in self.names if c not in saved]
        missing = [c for c in saved if c not in self.names]
        if unknown or missing:
            problems = ([f"unknown condition(s) {', '.join(unknown)}" if unknown else ""] +
                        [f"condition(s) {', '.join(missing)} of the saved run not given" if missing else ""])
            raise CtrLoRAError(
                f"{LABEL}: resume: {'; '.join(p for p in problems if p)}. The saved run in {self.run_folder} trains "
                f"{', '.join(saved)}: give exactly these conditions (name=folder) to continue it.")
        run_state.check_resumable(document, self.run_config(), self.run_folder, RUN_DEFINING, LABEL)
        return document, tensors

    def _check_outputs(self, saved):
        base_path, lora_paths = self.output_files(self.output_folder)
        for path in [base_path, *lora_paths.values()]:
            run_state.check_new_output(path, LABEL)
        if saved is None and os.path.isdir(self.run_folder) and os.listdir(self.run_folder):
            raise CtrLoRAError(
                f"{LABEL}: {self.run_folder} holds files of an earlier run of '{self.stem}' but no state to resume; "
                "choose another output name, or move that folder away (nothing is overwritten).")

    def _scan(self):
        self.pairs, self.reports = {}, {}
        for name in self.names:
            folder = self.conditions[name]
            try:
                self.pairs[name], self.reports[name] = scan(folder, self.template, self.name_pattern)
            except CtrLoRAError as e:
                raise CtrLoRAError(f"{LABEL}: condition '{name}' ({folder}): {_unlabelled(e)}") from e
        return {name: fingerprint(self.pairs[name], self.config.resolution) for name in self.names}

    def _initial_base(self, saved):
        unet = self.model.model.diffusion_model
        if saved is not None:
            tensors = {k[len("base."):]: v for k, v in saved[1].items() if k.startswith("base.")}
            base = base_from_tensors(tensors, os.path.basename(self.base_path), torch.float32)
        elif self.init_base:
            base = load_base(self.init_base, dtype=torch.float32)
        else:
            base = base_from_tensors(encoder_tensors(unet), os.path.basename(self.base_path), torch.float32)
        check_base_fits(base, unet)
        base.model.set_attention_heads(self.model.model.model_config.unet_config)
        return base

    def _local_setup(self):
        """Everything before the first collective that can fail: settings, saved run, outputs, datasets, base."""
        self.config.validate()
        self.saved = self._saved_run()
        self._check_outputs(self.saved)
        fingerprints = self._scan()
        if self.saved is not None:
            saved = {c["name"]: c for c in self.saved[0]["conditions"]}
            changed = [n for n in self.names if saved[n]["fingerprint"] != fingerprints[n]]
            if changed:
                raise CtrLoRAError(
                    f"{LABEL}: resume: the dataset of condition(s) {', '.join(changed)} differs from the saved run's "
                    f"({', '.join(str(saved[n]['pairs']) for n in changed)} pairs then, "
                    f"{', '.join(str(len(self.pairs[n])) for n in changed)} now, or other files/prompts).")
        check_resolution(self.model, self.vae, self.config.resolution, LABEL)
        self.objective = NoisePrediction(self.model, None)
        self.base = self._initial_base(self.saved)
        self.objective.base = self.base
        return {"step": self.saved[0]["step"] if self.saved else None, "fingerprints": fingerprints}

    def _encode(self):
        """Encodes this process's shard of every condition (sharded by the plan); pairs that cannot be read on any
        process are dropped everywhere and the plan is made again until every process has its shard."""
        latent_format = self.model.model.latent_format
        prompts = PromptCache(self.encode_prompt)
        with torch.no_grad():
            prompts.id(EMPTY_PROMPT)
        usable = {n: list(range(len(self.pairs[n]))) for n in self.names}
        rows = {n: {} for n in self.names}  # pair index -> row in this process's tensors
        local = {n: ([], [], []) for n in self.names}
        unreadable = {n: [] for n in self.names}
        while True:
            plan = Plan(self.config.seed, {n: len(usable[n]) for n in self.names}, self.global_batch)

            def work():
                failed = {}
                for name in self.names:
                    pairs = self.pairs[name]
                    todo = [usable[name][i] for i in plan.shard(name, self.positions)]
                    todo = [i for i in todo if i not in rows[name]]
                    if not todo:
                        continue
                    self.log(f"encoding {len(todo)} pairs of '{name}' (of {len(pairs)})")
                    hints, targets, ids, kept = encode_pairs(
                        [pairs[i] for i in todo], self.reports[name], self.vae, prompts, latent_format,
                        self.config.resolution)
                    k = 0
                    for i in todo:
                        if k < len(kept) and kept[k] is pairs[i]:
                            rows[name][i] = sum(len(t) for t in local[name][0]) + k
                            k += 1
                        else:
                            failed.setdefault(name, []).append(i)
                    if kept:
                        for store, value in zip(local[name], (hints, targets, ids)):
                            store.append(value)
                return failed

            outcomes = self.dist.gather(self.dist.exchange(work))
            failed = {n: sorted({i for o in outcomes for i in o.get(n, [])}) for n in self.names}
            if not any(failed.values()):
                break
            for name, indices in failed.items():
                unreadable[name] += [self.pairs[name][i].name for i in indices]
                usable[name] = [i for i in usable[name] if i not in set(indices)]
                if not usable[name]:
                    raise CtrLoRAError(f"{LABEL}: condition '{name}' ({self.conditions[name]}): no pair could be read "
                                       f"({len(unreadable[name])} unreadable).")
        check_prompt_widths(prompts)
        self.plan = plan
        self.unreadable = unreadable
        self.data, self.rows = {}, {}
        for name in self.names:
            hints, targets, ids = (torch.cat(store) for store in local[name])
            self.data[name] = EncodedDataset(hints=hints, targets=targets, prompt_ids=ids, contexts=prompts.contexts,
                                             prompts=list(prompts.ids), names=[], fingerprint="")
            self.rows[name] = torch.tensor([rows[name].get(i, -1) for i in usable[name]], dtype=torch.long)
        first = self.data[self.names[0]]
        self.objective.check_compatible(first.hints.shape[1], first.contexts[0].shape[-1])
        self.latent_shape = tuple(first.targets.shape[1:])

    def _setup_training(self):
        config = self.config
        self.device = comfy.model_management.get_torch_device()
        self.dtype = config.compute_dtype(self.device)
        saved = self.saved
        if saved is not None:
            document, tensors = saved
            order = [n for n in binding_names(self.base.model) if n.endswith(("lora_down", "lora_up"))]
            adapters = {name: ConditionAdapter({n: tensors[f"lora.{name}.{n}"] for n in order}, config.rank)
                        for name in self.names}
        else:
            adapters = {name: lora_adapter(self.base.model, config.rank, name, config.seed) for name in self.names}
        shape = [self.global_batch * 2, *self.latent_shape]
        comfy.model_management.load_models_gpu([self.model], memory_required=self.model.model.memory_required(shape))
        prepare_frozen(self.objective.unet)
        self.base.model.to(self.device)
        self.base.load_device = self.device
        self.base.model.requires_grad_(True)
        for adapter in adapters.values():
            adapter.to(self.device, torch.float32)
            adapter.requires_grad_(True)
        self.adapters = adapters
        self.module = PretrainModel(self.base, adapters, self.objective)
        self.param_names = [n for n, _ in self.named_tensors()]
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type) \
            if self.device.type == "cuda" and self.dtype == torch.float16 else None
        if saved is not None:
            document, tensors = saved
            if document["param_names"] != self.param_names:
                raise CtrLoRAError(f"{LABEL}: resume: the saved run in {self.run_folder} has other parameters "
                                   "(made by another version or for another model).")
            run_state.restore_optimizer(self.optimizer, document, tensors)
            for parameter in self.module.parameters():  # the zeroed gradients the saved run held (see train_step)
                if self.optimizer.state.get(parameter):
                    parameter.grad = torch.zeros_like(parameter)
            if self.scaler is not None and document.get("scaler"):
                self.scaler.load_state_dict(document["scaler"])
            self.step = document["step"]
            self.losses = [tuple(x) for x in document.get("losses", [])]
            self.notes.append(f"resumed at step {self.step}")

    def prepare(self):
        """Checks the inputs, encodes this process's shard once, and sets up the models and the optimizer (from the
        saved run when resuming). Every process raises the same error when any of them fails."""
        with torch.inference_mode(False), torch.enable_grad():
            views = self.dist.gather(self.dist.exchange(self._local_setup))
            if any(v != views[0] for v in views):
                raise CtrLoRAError(
                    f"{LABEL}: the processes see different datasets or saved runs ({views}); every machine needs the "
                    "same condition folders and the output folder on a shared filesystem.")
            self._encode()
            self.dist.exchange(self._setup_training)
            self.wrapped = self.dist.wrap(self.module, self.device)
        return self

    # --- the loop ----------------------------------------------------------------------------------------------------
    def batch(self, step):
        """``(condition, loss inputs)`` of this process's part of the global batch at ``step``."""
        name = self.plan.condition(step)
        items = self.plan.items(step, self.positions)
        dropped, timesteps, noise = self.plan.draws(step, self.objective.num_timesteps, self.config.prompt_dropout,
                                                    self.latent_shape)
        mine = slice(self.positions.start, self.positions.stop)
        data, rows, device = self.data[name], self.rows[name][items], self.device
        prompt_ids = torch.where(dropped[mine], torch.zeros_like(rows), data.prompt_ids[rows])
        return name, {
            "hint": data.hints[rows].to(device), "x0": data.targets[rows].to(device),
            "context": data.context_batch(prompt_ids, device, torch.float32),
            "timesteps": timesteps[mine].to(device), "noise": noise[mine].to(device),
        }

    def train_step(self, step):
        """Step ``step`` (0-based): one condition's batch, gradients averaged over the processes, one AdamW step.
        Returns ``(condition, mean loss of the global batch)``."""
        name, batch = self.batch(step)
        with self.autocast():
            loss = self.wrapped(name, batch)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        value = self.dist.mean(loss.item(), self.device)
        if not math.isfinite(value) and self.scaler is None:
            raise CtrLoRAError(f"{LABEL}: the loss became {value} at step {step + 1}; lower the learning rate.")
        self.in_update = True
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        # As the official run (torch 1.13): gradients are zeroed, not dropped (see the module doc).
        self.optimizer.zero_grad(set_to_none=False)
        self.in_update = False
        return name, value

    autocast = Trainer.autocast  # the same mixed precision as the training issue's loop (uses device and dtype)

    def _loop(self):
        config = self.config
        end = min(config.steps, config.stop_after) if config.stop_after else config.steps
        checkpointing = gradient_checkpointing(checkpoint_targets(self.base.model, self.objective.unet)) \
            if config.gradient_checkpointing else contextlib.nullcontext()
        self.log(f"training {', '.join(self.names)} from step {self.step} to {end} of {config.steps} "
                 f"({self.dist.world} process(es), global batch {self.global_batch})")
        started, first, last_log = time.monotonic(), self.step, 0.0
        with checkpointing:
            while self.step < end:
                name, loss = self.train_step(self.step)
                self.step += 1
                self.losses.append((self.step, name, loss))
                now = time.monotonic()
                if now - last_log >= 10 or self.step == end:
                    speed = (now - started) / (self.step - first)
                    self.log(f"step {self.step}/{config.steps} {name} loss {loss:.5f} ({speed:.3f} s/step)")
                    last_log = now
                if config.save_every and self.step % config.save_every == 0 and self.step < end:
                    self.save_state()
        return self.step >= config.steps

    # --- saving ------------------------------------------------------------------------------------------------------
    def _metadata(self, kind, condition=None):
        data = {name: len(self.rows[name]) for name in self.names}
        metadata = {
            "ctrlora_format": kind, "trainer": TRAINER, "steps": self.step, "rank": self.config.rank,
            "conditions": ",".join(self.names), "resolution": self.config.resolution, "learning_rate": self.config.lr,
            "global_batch": self.global_batch, "seed": self.config.seed, "prompt_dropout": self.config.prompt_dropout,
            "model": self.model_name, "init": self.run_config()["init"], "dataset_sizes": json.dumps(data),
        }
        if kind == "base":
            metadata["lora_layer_keys_from"] = self.names[0]
        else:
            metadata.update(condition=condition, base=os.path.basename(self.base_path), dataset_size=data[condition])
        return metadata

    def lora_tensors(self, name):
        """A condition's LoRA file: its LoRA layers plus the shared zero convs, middle_block_out and norms."""
        model, adapter = self.base.model, self.adapters[name]
        own = dict(zip(adapter.names, adapter.tensors))
        tensors = {n: own[n] if n in own else model.get_parameter(n) for n in binding_names(model)}
        return ConditionAdapter({n: t.detach() for n, t in tensors.items()}, adapter.rank).file_tensors()

    def base_tensors(self):
        """The base file: every shared tensor, plus the first condition's LoRA layers (see the module doc)."""
        tensors = {k: v.detach() for k, v in self.base.model.state_dict().items()}
        first = self.lora_tensors(self.names[0])
        tensors.update({k: v for k, v in first.items() if "lora_layer" in k})
        return tensors

    def write_outputs(self, folder):
        """The base and every condition's LoRA in ``folder`` (existing files are kept: same run, same step)."""
        base_path, lora_paths = self.output_files(folder)
        for path, tensors, metadata in [(base_path, self.base_tensors(), self._metadata("base"))] + \
                [(lora_paths[n], self.lora_tensors(n), self._metadata("lora", n)) for n in self.names]:
            if not os.path.exists(path):
                save_lora_file(tensors, path, metadata)
        return base_path, lora_paths

    def named_tensors(self):
        """Every trained tensor under its name in the state, in the optimizer's order."""
        named = [(f"base.{n}", p) for n, p in self.base.model.named_parameters()]
        for name, adapter in self.adapters.items():
            named += [(f"lora.{name}.{n}", t) for n, t in zip(adapter.names, adapter.tensors)]
        assert [id(t) for _, t in named] == [id(p) for p in self.module.parameters()]
        return named

    def save_state(self):
        """Process 0 writes the resumable state and a snapshot of the outputs at the current step boundary."""
        if not self.dist.is_writer:
            return None
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.named_tensors()}
        optimizer_tensors, optimizer_document = run_state.optimizer_entries(self.optimizer)
        tensors.update(optimizer_tensors)
        conditions = [{"name": n, "folder": self.conditions[n], "pairs": len(self.pairs[n]),
                       "fingerprint": fingerprint(self.pairs[n], self.config.resolution)} for n in self.names]
        run_state.write_state(self.run_folder, self.step, tensors, {
            "kind": "pretrain", "config": self.run_config(), "conditions": conditions,
            "param_names": self.param_names, "optimizer": optimizer_document, "world": self.dist.world,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "losses": [list(x) for x in self.losses],
        })
        return self.write_outputs(os.path.join(self.run_folder, f"step{self.step:06d}"))

    def _finish(self):
        paths = None
        if self.dist.is_writer:
            paths = self.write_outputs(self.output_folder)
            run_state.remove_state(self.run_folder)
            if os.path.isdir(self.run_folder) and not os.listdir(self.run_folder):
                os.rmdir(self.run_folder)
        return paths

    def run(self):
        self.prepare()
        with torch.inference_mode(False), torch.enable_grad():
            try:
                finished = self._loop()
            except KeyboardInterrupt:
                if not self.dist.active and not self.in_update and self.step > 0:
                    self.save_state()
                    self.log(f"interrupted; saved the state at step {self.step}: resume to continue")
                raise
            paths = self.dist.exchange(self._finish if finished else self.save_state)
        status = "done" if finished else "stopped"
        base_path, lora_paths = paths or self.output_files(self.output_folder)
        lines = [f"{status} at step {self.step}/{self.config.steps}: base {base_path}; " +
                 ", ".join(f"{n}: {os.path.basename(p)}" for n, p in lora_paths.items())]
        if not finished:
            lines.append("run again with resume to continue")
        lines += [f"{n}: {len(self.rows[n])} pairs" + (f", {len(self.unreadable[n])} unreadable skipped"
                                                        if self.unreadable[n] else "") for n in self.names]
        lines += self.notes
        self.log("; ".join(lines))
        return PretrainResult(status, self.step, base_path, lora_paths, list(self.losses), "\n".join(lines))


# --- the command line ------------------------------------------------------------------------------------------------

def load_models(checkpoint=None, models_from=None):
    """``(MODEL, prompt encoder, VAE, name)`` from a ComfyUI checkpoint file (a path, or a name in
    models/checkpoints), or from ``file.py:function`` / ``module:function`` returning ``(MODEL, CLIP or prompt
    encoder, VAE)``."""
    import comfy.sd
    import folder_paths
    if models_from:
        target, _, function = models_from.rpartition(":")
        if not target or not function:
            raise CtrLoRAError(f"{LABEL}: --models-from {models_from!r}: write it as file.py:function or "
                               "module:function.")
        if target.endswith(".py"):
            sys.path.insert(0, os.path.dirname(os.path.abspath(target)))  # its own imports
            spec = importlib.util.spec_from_file_location(f"ctrlora_models_{abs(hash(target))}", target)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
        model, text, vae = getattr(module, function)()
        name = models_from
    else:
        path = checkpoint if os.path.isfile(checkpoint) else folder_paths.get_full_path("checkpoints", checkpoint)
        if path is None:
            raise CtrLoRAError(f"{LABEL}: checkpoint {checkpoint} not found (a path, or a file in models/checkpoints).")
        name = os.path.basename(path)
        try:
            model, text, vae, _ = comfy.sd.load_checkpoint_guess_config(
                path, output_vae=True, output_clip=True,
                embedding_directory=folder_paths.get_folder_paths("embeddings"))
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CtrLoRAError(f"{LABEL}: {name} is not a Stable Diffusion checkpoint ComfyUI can load ({first}).") from e
        if text is None or vae is None:
            raise CtrLoRAError(f"{LABEL}: {name} has no {'CLIP' if text is None else 'VAE'}; use a full checkpoint.")
    encode = clip_prompt_encoder(text) if hasattr(text, "tokenize") else text
    return model, encode, vae, name


def parser():
    p = argparse.ArgumentParser(
        prog="pretrain_base.py", description=(
            "Pretrain a CtrLoRA Base ControlNet on several conditions (one LoRA each), on one process or, under "
            "torchrun, on many GPUs or machines (DDP; NCCL on GPUs, gloo on the CPU)."))
    models = p.add_mutually_exclusive_group(required=True)
    models.add_argument("--checkpoint", help="SD1.5-family checkpoint (path, or a name in ComfyUI's models/checkpoints)")
    models.add_argument("--models-from", metavar="FILE.py:FUNCTION",
                        help="advanced: a function returning (MODEL, CLIP or prompt encoder, VAE)")
    p.add_argument("--condition", action="append", default=[], metavar="NAME=FOLDER", required=True,
                   help="a condition and its dataset folder (prompt.json, or source/ + target/); repeat per condition")
    p.add_argument("--init-base", help="continue from an existing base file instead of the checkpoint's UNet")
    p.add_argument("--output-dir", help="where the files go (default: ComfyUI's models/ctrlora)")
    p.add_argument("--name", default="ctrlora_sd15_basecn", help="base file name; LoRAs are <name>_<cond>_rank<r>")
    p.add_argument("--prompt-template", default="", help="prompt from the file name, e.g. 'a photo, {name}'")
    p.add_argument("--name-pattern", default="", help="names the file-name fields for the template")
    defaults = PretrainConfig()
    p.add_argument("--rank", type=int, default=defaults.rank, help="LoRA rank (official: 128)")
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="per process (official: 4 per GPU)")
    p.add_argument("--lr", type=float, default=defaults.lr, help="AdamW learning rate (official: 1e-5)")
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--prompt-dropout", type=float, default=defaults.prompt_dropout)
    p.add_argument("--resolution", type=int, default=defaults.resolution)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--save-every", type=int, default=defaults.save_every, help="steps between resumable saves")
    p.add_argument("--stop-after", type=int, default=0, help="save and stop at this step (then --resume)")
    p.add_argument("--resume", action="store_true", help="continue the saved run of --name")
    p.add_argument("--precision", default=defaults.precision, choices=["auto", *PRECISIONS])
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per process (0: torch's default)")
    p.add_argument("--cpu", action="store_true", help="train on the CPU (gloo) even with CUDA")
    return p


def main(argv=None, dist=None):
    """The command line. Returns the exit status (0 done or stopped, 2 bad input)."""
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    own_dist = dist is None
    dist = dist or Distributed.from_env(cpu=args.cpu)
    try:
        config = PretrainConfig(
            rank=args.rank, steps=args.steps, batch_size=args.batch_size, lr=args.lr, prompt_dropout=args.prompt_dropout,
            resolution=args.resolution, seed=args.seed, save_every=args.save_every, stop_after=args.stop_after,
            precision=args.precision, weight_decay=args.weight_decay, gradient_checkpointing=args.gradient_checkpointing)
        config.validate()
        conditions = parse_conditions(args.condition)
        output = args.output_dir or _default_output_folder()
        model, encode, vae, model_name = dist.exchange(lambda: load_models(args.checkpoint, args.models_from))
        result = Pretrainer(model, encode, vae, conditions, output, args.name, config, template=args.prompt_template,
                            name_pattern=args.name_pattern, init_base=args.init_base, resume=args.resume, dist=dist,
                            model_name=model_name, log=lambda message: print(message, flush=True)).run()
    except CtrLoRAError as e:
        if dist.is_writer:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if own_dist:
            dist.close()
    if dist.is_writer:
        print(result.report, flush=True)
    return 0


def _default_output_folder():
    import folder_paths
    return folder_paths.get_folder_paths("ctrlora")[0]

