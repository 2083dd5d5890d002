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
* Batch 1 per GPU, gradient accumulation 4, each micro-batch from one condition, each process drawing its own
  condition order: one update mixes conditions (``mix="micro-batch"``, the default here; ``sharding`` makes the
  draws a function of the seed, not of the process count). ``mix="update"`` trains one condition per update.
* The official run's torch 1.13 ``zero_grad()`` keeps zero gradients: once a condition's LoRA has been trained,
  it takes an AdamW step with a zero gradient in the updates that do not use it (its moments decay and weight
  decay applies). ``precision.Updater`` zeroes gradients the same way.

Where this module differs: latents and prompt embeddings are encoded once by ``pretrain_data`` (posterior mode, as
at inference) and streamed from disk (``streaming``) instead of being re-encoded at every step.

Files (``pretrain_files``): the base and one LoRA per condition in the official layouts, a resumable state and
snapshots in ``<name>.train/``.
"""
import contextlib
import dataclasses
import logging
import os
import time

import torch

import comfy.model_management

from ..ctrlora_core import Condition, ConditionAdapter, CtrLoRAError
from ..ctrlora_core.base import base_from_tensors, load_base
from ..ctrlora_core.lora import binding_names
from .checkpointing import checkpoint_targets, gradient_checkpointing
from .distributed import Distributed
from .frozen import prepare_frozen
from .loop import RANK_RANGE
from .objective import NoisePrediction
from .precision import PRECISIONS, Updater, choose_precision
from .pretrain_data import LABEL, prepared_conditions
from .pretrain_files import RunFiles
from .sharding import Plan, generator, micro_batches_of
from .streaming import StreamedPairs, context_batch, loader

ENCODER_PARTS = ("time_embed", "input_blocks", "middle_block")
MIXES = ("micro-batch", "update")
# Settings that define a run: a resume with other values would not continue the same run.
RUN_DEFINING = ("rank", "micro_batch", "micro_batches", "lr", "prompt_dropout", "seed", "weight_decay", "precision",
                "mix", "model")


@dataclasses.dataclass
class PretrainConfig:
    rank: int = 128
    steps: int = 10000  # optimizer updates
    batch_size: int = 1  # per process and micro-batch (official: 1)
    grad_accum: int = 4  # micro-batches per process and update (official: 4)
    mix: str = "micro-batch"  # a condition per micro-batch (official) or per update
    lr: float = 1e-5
    prompt_dropout: float = 0.3
    seed: int = 0
    weight_decay: float = 0.01  # torch.optim.AdamW's default, as the official training
    precision: str = "auto"  # see precision.choose_precision
    gradient_checkpointing: bool = False
    save_every: int = 1000
    keep_snapshots: int = 3  # snapshots of the outputs kept in the run folder (the newest); the state is always kept
    stop_after: int = 0  # > 0: save the state and stop at this step (continue later with resume)
    workers: int = 2  # DataLoader processes reading the shards, per training process

    def validate(self):
        checks = [
            (RANK_RANGE[0] <= self.rank <= RANK_RANGE[1], f"rank {self.rank} is out of range {RANK_RANGE}"),
            (self.steps >= 1, f"steps must be at least 1 (got {self.steps})"),
            (self.batch_size >= 1, f"batch size must be at least 1 (got {self.batch_size})"),
            (self.grad_accum >= 1, f"gradient accumulation must be at least 1 (got {self.grad_accum})"),
            (self.mix in MIXES, f"mix must be one of {', '.join(MIXES)} (got {self.mix!r})"),
            (0 < self.lr <= 1, f"learning rate must be in (0, 1] (got {self.lr})"),
            (0 <= self.prompt_dropout <= 1, f"prompt dropout must be in [0, 1] (got {self.prompt_dropout})"),
            (self.precision == "auto" or self.precision in PRECISIONS,
             f"precision must be auto, {', '.join(PRECISIONS)} (got {self.precision!r})"),
            (self.save_every >= 0, f"save_every must be 0 (only at the end) or more (got {self.save_every})"),
            (self.keep_snapshots >= 0, f"keep_snapshots must be 0 or more (got {self.keep_snapshots})"),
            (self.stop_after >= 0, f"stop_after must be 0 (run to the end) or more (got {self.stop_after})"),
            (self.workers >= 0, f"workers must be 0 (read in the training process) or more (got {self.workers})"),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise CtrLoRAError(f"{LABEL}: " + "; ".join(problems) + ".")

    def advice(self):
        return f"a lower --lr (now {self.lr:g}) or --precision fp32"


@dataclasses.dataclass
class PretrainResult:
    status: str  # "done" or "stopped" (at stop_after; resume to continue)
    step: int
    base_path: str  # the output files ("done") or the latest snapshot's ("stopped")
    lora_paths: dict
    losses: list  # (step, mean loss of the update)
    report: str


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
    """One pretraining run on prepared data (``pretrain_data``); ``run()`` returns only after process 0 wrote the
    outputs (or the state, when stopped)."""

    def __init__(self, model, data_folder, output_folder, name, config, init_base=None, resume=False, dist=None,
                 model_name="model", log=None):
        self.model = model
        self.data_folder = str(data_folder)
        self.config = config
        self.init_base = init_base
        self.resume = resume
        self.dist = dist or Distributed.single()
        self.model_name = model_name
        self._log = log or logging.info
        self.micro_batches = self.dist.world * config.grad_accum
        self.mine = micro_batches_of(self.dist.rank, config.grad_accum)
        self.step = 0
        self.losses = []
        self.notes = []
        self.in_update = False
        self.files = None
        self.output_folder, self.name = str(output_folder), name

    def log(self, message):
        if self.dist.is_writer:
            self._log(f"{LABEL}: {message}")

    def run_config(self):
        return {**dataclasses.asdict(self.config), "micro_batch": self.config.batch_size,
                "micro_batches": self.micro_batches, "model": self.model_name,
                "init": os.path.basename(self.init_base) if self.init_base else f"{self.model_name} (UNet encoder)"}

    # --- setup -------------------------------------------------------------------------------------------------------
    def _initial_base(self, saved):
        unet = self.model.model.diffusion_model
        if saved is not None:
            tensors = {k[len("base."):]: v for k, v in saved[1].items() if k.startswith("base.")}
            base = base_from_tensors(tensors, os.path.basename(self.files.base_path), torch.float32)
        elif self.init_base:
            base = load_base(self.init_base, dtype=torch.float32)
        else:
            base = base_from_tensors(encoder_tensors(unet), os.path.basename(self.files.base_path), torch.float32)
        check_base_fits(base, unet)
        base.model.set_attention_heads(self.model.model.model_config.unet_config)
        return base

    def _local_setup(self):
        """Everything before the first collective that can fail: settings, data, saved run, outputs, base."""
        self.config.validate()
        self.data = StreamedPairs(prepared_conditions(self.data_folder), LABEL)
        self.names = sorted(self.data.folders)
        self.files = RunFiles(self.output_folder, self.name, self.names, self.config.rank, self.dist.is_writer)
        fingerprints = {n: self.data.info(n)["fingerprint"] for n in self.names}
        self.saved = self.files.saved_run(self.resume, self.run_config(), fingerprints, RUN_DEFINING)
        if self.saved is None and self.resume:
            self.notes.append(f"no saved run in {self.files.run_folder}: started a new one")
        self.files.check_outputs(self.saved)
        self.objective = NoisePrediction(self.model, None)
        info = self.data.info(self.names[0])
        self.latent_shape = tuple(info["latent_shape"])
        for name in self.names:
            if tuple(self.data.info(name)["latent_shape"]) != self.latent_shape:
                raise CtrLoRAError(f"{LABEL}: the conditions were prepared at other resolutions or with other models "
                                   f"('{self.names[0]}' {self.latent_shape}, '{name}' "
                                   f"{tuple(self.data.info(name)['latent_shape'])}); prepare them alike.")
            if self.data.info(name)["model"] != self.model_name:
                self.notes.append(f"'{name}' was prepared with {self.data.info(name)['model']}, trained with "
                                  f"{self.model_name}")
        self.base = self._initial_base(self.saved)
        self.objective.base = self.base
        self.objective.check_compatible(self.latent_shape[0], info["context_dim"])
        return {"step": self.saved[0]["step"] if self.saved else None, "fingerprints": fingerprints}

    def _adapters(self):
        if self.saved is None:
            return {n: lora_adapter(self.base.model, self.config.rank, n, self.config.seed) for n in self.names}
        tensors = self.saved[1]
        order = [n for n in binding_names(self.base.model) if n.endswith(("lora_down", "lora_up"))]
        return {name: ConditionAdapter({n: tensors[f"lora.{name}.{n}"] for n in order}, self.config.rank)
                for name in self.names}

    def _setup_training(self):
        config = self.config
        self.device = comfy.model_management.get_torch_device()
        self.precision = choose_precision(config.precision, self.device, (self.objective.unet_dtype,), LABEL)
        if self.precision.note:
            self.notes.append(self.precision.note)
        adapters = self._adapters()
        prepare_frozen(self.model.model)
        shape = [config.batch_size * 2, *self.latent_shape]
        comfy.model_management.load_models_gpu([self.model], memory_required=self.model.model.memory_required(shape))
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
        self.updater = Updater(self.precision, self.optimizer, LABEL, config.advice())
        if self.saved is not None:
            document, tensors = self.saved
            if document["param_names"] != self.param_names:
                raise CtrLoRAError(f"{LABEL}: resume: the saved run in {self.files.run_folder} has other parameters "
                                   "(made by another version or for another model).")
            self.files.restore_optimizer(self.optimizer, document, tensors)
            for parameter in self.module.parameters():  # the zeroed gradients the saved run held (see Updater.step)
                if self.optimizer.state.get(parameter):
                    parameter.grad = torch.zeros_like(parameter)
            self.updater.load_state(document.get("updater") or {})
            self.step = document["step"]
            self.losses = [tuple(x) for x in document.get("losses", [])]
            self.notes.append(f"resumed at step {self.step}")

    def prepare(self):
        """Checks the inputs and sets up the data, the models and the optimizer (from the saved run when resuming).
        Every process raises the same error when any of them fails."""
        with torch.inference_mode(False), torch.enable_grad():
            views = self.dist.gather(self.dist.exchange(self._local_setup))
            if any(v != views[0] for v in views):
                raise CtrLoRAError(
                    f"{LABEL}: the processes see different data or saved runs ({views}); every machine needs the "
                    "same data folder and output folder (a shared filesystem).")
            self.plan = Plan(self.config.seed, self.data.sizes(), self.config.batch_size, self.micro_batches,
                             mixed=self.config.mix == "micro-batch")
            self.dist.exchange(self._setup_training)
            self.wrapped = self.dist.wrap(self.module, self.device)
        return self

    # --- the loop ----------------------------------------------------------------------------------------------------
    def batches(self, end):
        """This process's micro-batches from the current step to ``end``, read by the DataLoader workers:
        ``(step, j, condition, loss inputs)``."""
        data = loader(self.data, self.plan, self.mine, self.step, end, self.config.workers)
        micro = iter(data)
        for step in range(self.step, end):
            for j in self.mine:
                name, tensors = next(micro)
                dropped, timesteps, noise = self.plan.draws(step, j, self.objective.num_timesteps,
                                                            self.config.prompt_dropout, self.latent_shape)
                empty = self.data.empty_prompts[name]
                contexts = [empty if drop else c for drop, c in zip(dropped.tolist(), tensors["context"])]
                yield step, j, name, {
                    "hint": tensors["hint"].to(self.device), "x0": tensors["x0"].to(self.device),
                    "context": context_batch(contexts, self.device, torch.float32),
                    "timesteps": timesteps.to(self.device), "noise": noise.to(self.device),
                }

    def train_step(self, micro_batches):
        """One update from this process's ``grad_accum`` micro-batches (``(step, j, condition, inputs)``):
        gradients averaged over every micro-batch of every process, one AdamW step. Returns the mean loss."""
        total = 0.0
        for k, (step, _, name, batch) in enumerate(micro_batches):
            last = k == self.config.grad_accum - 1
            sync = contextlib.nullcontext() if last or not self.dist.active else self.wrapped.no_sync()
            with sync:
                with self.updater.autocast():
                    loss = self.wrapped(name, batch)
                self.updater.backward(loss, self.config.grad_accum)
            total += loss.item() / self.config.grad_accum
        value = self.dist.mean(total, self.device)
        self.updater.check_loss(value, step + 1)
        self.in_update = True
        self.updater.step(step + 1)
        self.in_update = False
        return value

    def _loop(self):
        config = self.config
        end = min(config.steps, config.stop_after) if config.stop_after else config.steps
        checkpointing = gradient_checkpointing(checkpoint_targets(self.base.model, self.objective.unet)) \
            if config.gradient_checkpointing else contextlib.nullcontext()
        self.log(f"training {', '.join(self.names)} from step {self.step} to {end} of {config.steps} "
                 f"({self.dist.world} process(es) x accumulation {config.grad_accum} x batch {config.batch_size}, "
                 f"a condition per {config.mix}; {self.precision.describe()})")
        self.log(self.files.disk_estimate(self.base_tensors(), {n: self.lora_tensors(n) for n in self.names},
                                          self.optimizer, config))
        started, first, last_log = time.monotonic(), self.step, 0.0
        micro = self.batches(end)
        with checkpointing:
            while self.step < end:
                loss = self.train_step([next(micro) for _ in range(config.grad_accum)])
                self.step += 1
                self.losses.append((self.step, loss))
                now = time.monotonic()
                if now - last_log >= 10 or self.step == end:
                    speed = (now - started) / (self.step - first)
                    self.log(f"step {self.step}/{config.steps} loss {loss:.5f} ({speed:.3f} s/step)")
                    last_log = now
                if config.save_every and self.step % config.save_every == 0 and self.step < end:
                    self.save_state()
        self.updater.check_finished()
        return self.step >= config.steps

    # --- saving ------------------------------------------------------------------------------------------------------
    def metadata(self):
        sizes = self.data.sizes()
        return {"trainer": "comfyui-ctrlora pretrain_base", "steps": self.step, "rank": self.config.rank,
                "conditions": ",".join(self.names), "resolution": self.data.info(self.names[0])["resolution"],
                "learning_rate": self.config.lr, "batch_size": self.config.batch_size,
                "grad_accum": self.config.grad_accum, "processes": self.dist.world, "mix": self.config.mix,
                "seed": self.config.seed, "prompt_dropout": self.config.prompt_dropout, "model": self.model_name,
                "init": self.run_config()["init"], "dataset_sizes": sizes,
                "precision": self.precision.describe(), "skipped_steps": self.updater.skipped}

    def lora_tensors(self, name):
        """A condition's LoRA file: its LoRA layers plus the shared zero convs, middle_block_out and norms."""
        model, adapter = self.base.model, self.adapters[name]
        own = dict(zip(adapter.names, adapter.tensors))
        tensors = {n: own[n] if n in own else model.get_parameter(n) for n in binding_names(model)}
        return ConditionAdapter({n: t.detach() for n, t in tensors.items()}, adapter.rank).file_tensors()

    def base_tensors(self):
        """The base file: every shared tensor, plus the first condition's LoRA layers (as released bases)."""
        tensors = {k: v.detach() for k, v in self.base.model.state_dict().items()}
        first = self.lora_tensors(self.names[0])
        tensors.update({k: v for k, v in first.items() if "lora_layer" in k})
        return tensors

    def named_tensors(self):
        """Every trained tensor under its name in the state, in the optimizer's order."""
        named = [(f"base.{n}", p) for n, p in self.base.model.named_parameters()]
        for name, adapter in self.adapters.items():
            named += [(f"lora.{name}.{n}", t) for n, t in zip(adapter.names, adapter.tensors)]
        assert [id(t) for _, t in named] == [id(p) for p in self.module.parameters()]
        return named

    def _outputs(self):
        return self.base_tensors(), {n: self.lora_tensors(n) for n in self.names}, self.metadata()

    def save_state(self):
        """Process 0 writes the resumable state and a snapshot of the outputs at the current step boundary."""
        if not self.dist.is_writer:
            return None
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.named_tensors()}
        conditions = [{"name": n, "folder": self.data.folders[n], "pairs": self.data.sizes()[n],
                       "fingerprint": self.data.info(n)["fingerprint"]} for n in self.names]
        return self.files.save(self.step, tensors, self.optimizer, {
            "kind": "pretrain", "config": self.run_config(), "conditions": conditions, "world": self.dist.world,
            "param_names": self.param_names, "updater": self.updater.state(),
            "losses": [list(x) for x in self.losses]}, *self._outputs(), keep=self.config.keep_snapshots)

    def _finish(self):
        return self.files.finish(*self._outputs()) if self.dist.is_writer else None

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
        base_path, lora_paths = paths or self.files.output_files(self.output_folder)
        lines = [f"{status} at step {self.step}/{self.config.steps}: base {base_path}; " +
                 ", ".join(f"{n}: {os.path.basename(p)}" for n, p in lora_paths.items())]
        if not finished:
            lines.append("run again with resume to continue")
        for name in self.names:
            unreadable = self.data.info(name)["unreadable"]
            lines.append(f"{name}: {self.data.sizes()[name]} pairs" +
                         (f", {len(unreadable)} unreadable skipped when prepared" if unreadable else ""))
        if self.updater.skipped:
            lines.append(f"{self.updater.skipped} of {self.step} updates were skipped by the fp16 loss scaler")
        lines += self.notes
        self.log("; ".join(lines))
        return PretrainResult(status, self.step, base_path, lora_paths, list(self.losses), "\n".join(lines))
