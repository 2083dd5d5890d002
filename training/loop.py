"""Training a condition LoRA: the official recipe (frozen UNet and base; LoRA on every Linear plus the condition's
own zero convs, middle_block_out and transformer norms; AdamW; noise-prediction MSE; prompt dropout), run fast
(latents and prompt embeddings encoded once; mixed precision on GPUs), visibly, cancellably and resumably.

A run's randomness comes from one seeded CPU generator, drawn in a fixed order (data order per epoch, prompt
dropout, timesteps, noise), and is saved with the weights and AdamW's state at step boundaries: a resumed run
continues exactly where the saved one stopped.
"""
import contextlib
import dataclasses
import logging
import os

import torch

import comfy.model_management

from ..ctrlora_core import Condition, ConditionAdapter, CtrLoRAError
from ..ctrlora_core.checkpoint import load_state_dict, save_lora_file
from . import state as run_state
from .checkpointing import checkpoint_targets, gradient_checkpointing
from .dataset import scan
from .encode import encode_dataset
from .objective import NoisePrediction
from .progress import ComfyReporter

RANK_RANGE = (1, 1024)
RESOLUTION_RANGE = (32, 2048)
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass
class TrainConfig:
    rank: int = 128
    steps: int = 1000
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-5
    prompt_dropout: float = 0.3
    resolution: int = 512
    seed: int = 0
    save_every: int = 250
    gradient_checkpointing: bool = False
    precision: str = "auto"  # auto: bf16 (or fp16) autocast on CUDA, fp32 elsewhere
    weight_decay: float = 0.01  # torch.optim.AdamW's default, as the official training

    def validate(self):
        checks = [
            (RANK_RANGE[0] <= self.rank <= RANK_RANGE[1], f"rank {self.rank} is out of range {RANK_RANGE}"),
            (RESOLUTION_RANGE[0] <= self.resolution <= RESOLUTION_RANGE[1],
             f"resolution {self.resolution} is out of range {RESOLUTION_RANGE}"),
            (self.steps >= 1, f"steps must be at least 1 (got {self.steps})"),
            (self.batch_size >= 1, f"batch size must be at least 1 (got {self.batch_size})"),
            (self.grad_accum >= 1, f"gradient accumulation must be at least 1 (got {self.grad_accum})"),
            (0 < self.lr <= 1, f"learning rate must be in (0, 1] (got {self.lr})"),
            (0 <= self.prompt_dropout <= 1, f"prompt dropout must be in [0, 1] (got {self.prompt_dropout})"),
            (self.save_every >= 0, f"save_every must be 0 (only at the end) or more (got {self.save_every})"),
            (self.precision == "auto" or self.precision in PRECISIONS,
             f"precision must be auto, {', '.join(PRECISIONS)} (got {self.precision!r})"),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise CtrLoRAError("Train CtrLoRA: " + "; ".join(problems) + ".")

    def compute_dtype(self, device):
        if self.precision != "auto":
            return PRECISIONS[self.precision]
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32


@dataclasses.dataclass
class TrainResult:
    condition: Condition
    path: str
    steps: int
    losses: list
    report: str


def prepare_frozen(module):
    """Freezes ``module`` for training through it. Weights created inside a ComfyUI node (under inference mode)
    cannot be saved for backward: those are replaced by normal copies with the same values (the module stays
    usable for inference)."""
    module.requires_grad_(False)
    with torch.inference_mode(False):
        for sub in module.modules():
            for store in (sub._parameters, sub._buffers):
                for key, tensor in store.items():
                    if tensor is not None and tensor.is_inference():
                        copy = tensor.clone()
                        store[key] = torch.nn.Parameter(copy, requires_grad=False) \
                            if isinstance(tensor, torch.nn.Parameter) else copy


def check_resolution(model, vae, resolution, label):
    """Training images must survive the VAE's and the UNet's downsampling whole."""
    unet_config = model.model.model_config.unet_config
    factor = vae.downscale_ratio if isinstance(vae.downscale_ratio, int) else 8
    factor *= 2 ** (len(unet_config.get("channel_mult", [1])) - 1)
    if resolution % factor:
        raise CtrLoRAError(f"{label}: resolution {resolution} must be a multiple of {factor} "
                           f"for this model (e.g. {max(factor, resolution // factor * factor)}).")


def lora_metadata(config, run):
    return {
        "ctrlora_format": "lora", "rank": run["rank"], "base": run["base"], "steps": run["step"],
        "dataset_size": run["dataset_size"], "prompt_template": run["template"], "resolution": config.resolution,
        "learning_rate": config.lr, "batch_size": config.batch_size, "grad_accum": config.grad_accum,
        "prompt_dropout": config.prompt_dropout, "seed": config.seed, "start_from": run["start_from"] or "",
        "trainer": "comfyui-ctrlora Train CtrLoRA",
    }


class Trainer:
    """One training run; ``run()`` returns a ``TrainResult`` only after the output file is written."""

    def __init__(self, model, base, vae, encode_prompt, dataset_folder, output_folder, output_name, config,
                 template="", name_pattern="", start_from=None, resume=True, reporter=None):
        self.model, self.base, self.vae, self.encode_prompt = model, base, vae, encode_prompt
        self.dataset_folder, self.template, self.name_pattern = dataset_folder, template, name_pattern
        self.config = config
        self.start_from = start_from
        self.resume = resume
        self.output_path, self.run_folder = run_state.output_paths(output_folder, output_name)
        self.stem = os.path.basename(self.output_path)[:-len(run_state.LORA_EXTENSION)]
        self.reporter = reporter or ComfyReporter(output=self.stem)
        self.notes = []
        self.losses = []
        self.step = 0
        self.data = None
        self.dataset_report = None
        self.in_update = False

    # --- setup ------------------------------------------------------------------------------------------------------
    def run_config(self):
        """The settings a resume must match (see ``state.RUN_DEFINING``), plus informative ones."""
        return {
            **dataclasses.asdict(self.config), "base": self.base.name, "template": self.template,
            "name_pattern": self.name_pattern,
            "start_from": os.path.basename(self.start_from) if self.start_from else None,
        }

    def _saved_run(self):
        if not run_state.has_state(self.run_folder):
            return None
        if not self.resume:
            raise CtrLoRAError(
                f"Train CtrLoRA: a saved run of '{self.stem}' exists in {self.run_folder}. Turn resume on to continue "
                "it, or choose another output name (or delete that folder to start over).")
        document, tensors = run_state.load_state(self.run_folder)
        run_state.check_resumable(document, self.run_config(), self.run_folder)
        if document["config"].get("seed") != self.config.seed:
            self.notes.append(f"resumed with the saved run's random state (seed input {self.config.seed} not used)")
        return document, tensors

    def _initial_adapter(self, saved, generator):
        model = self.base.model
        if saved is not None:
            document, tensors = saved
            adapter = ConditionAdapter({n: tensors[f"adapter.{n}"] for n in document["names"]}, document["rank"])
        elif self.start_from:
            name = os.path.basename(self.start_from)
            adapter = ConditionAdapter.from_file_tensors(load_state_dict(self.start_from), model, name)
            if adapter.rank != self.config.rank:
                raise CtrLoRAError(f"Train CtrLoRA: start_from {name} has rank {adapter.rank} but rank is set to "
                                   f"{self.config.rank}; set rank to {adapter.rank} to continue training it.")
        else:
            adapter = ConditionAdapter.fresh(model, self.config.rank, generator)
        return adapter

    def _encode(self, pairs, report):
        latent_format = self.model.model.latent_format
        self.data = encode_dataset(
            pairs, report, self.vae, self.encode_prompt, latent_format, self.config.resolution,
            on_progress=self.reporter.encoding, check_cancel=self.reporter.check_cancel,
        )
        return self.data

    # --- the loop ---------------------------------------------------------------------------------------------------
    def _rng_state(self):
        return {"generator": self.generator.get_state(), "order": self.order.clone(), "cursor": self.cursor,
                "epoch": self.epoch}

    def _set_rng_state(self, saved):
        document, tensors = saved
        self.generator.set_state(tensors["rng.generator"])
        self.order = tensors["rng.order"].long()
        self.cursor, self.epoch = document["rng"]["cursor"], document["rng"]["epoch"]

    def _indices(self, count):
        n = len(self.data)
        picked, missing = [], count
        while missing:
            if self.cursor >= n:
                self.order = torch.randperm(n, generator=self.generator)
                self.cursor = 0
                self.epoch += 1
            take = min(missing, n - self.cursor)
            picked.append(self.order[self.cursor:self.cursor + take])
            self.cursor += take
            missing -= take
        return torch.cat(picked)

    def draw(self):
        """The random choices of one micro-batch, from the run's generator in a fixed order: items, prompt dropout,
        timesteps, noise."""
        bs = self.config.batch_size
        ids = self._indices(bs)
        dropped = torch.rand(bs, generator=self.generator) < self.config.prompt_dropout
        timesteps = torch.randint(0, self.objective.num_timesteps, (bs,), generator=self.generator)
        noise = torch.randn((bs, *self.data.targets.shape[1:]), generator=self.generator)
        return ids, dropped, timesteps, noise

    def make_batch(self, ids, dropped, timesteps, noise):
        """The loss inputs of a micro-batch, from the encode-once cache."""
        data, device = self.data, self.device
        prompt_ids = torch.where(dropped, torch.zeros_like(ids), data.prompt_ids[ids])
        return {
            "hint": data.hints[ids].to(device), "x0": data.targets[ids].to(device),
            "context": data.context_batch(prompt_ids, device, torch.float32),
            "timesteps": timesteps.to(device), "noise": noise.to(device),
        }

    def train_step(self):
        """One optimizer step over ``grad_accum`` micro-batches; returns the mean loss."""
        total = 0.0
        for _ in range(self.config.grad_accum):
            self.reporter.check_cancel()
            batch = self.make_batch(*self.draw())
            with self.autocast():
                loss = self.objective.loss(self.condition, **batch)
            scaled = loss / self.config.grad_accum
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            total += loss.item() / self.config.grad_accum
        if not torch.isfinite(torch.tensor(total)) and self.scaler is None:
            raise CtrLoRAError(f"Train CtrLoRA: the loss became {total} at step {self.step + 1}; lower the learning rate.")
        self.in_update = True
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.in_update = False
        return total

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _metadata(self):
        return lora_metadata(self.config, {
            "rank": self.adapter.rank, "base": self.base.name, "step": self.step, "dataset_size": len(self.data),
            "template": self.template, "start_from": self.run_config()["start_from"],
        })

    def save_state(self):
        """Saves the resumable state and an intermediate LoRA at the current step boundary."""
        run_state.save_state(self.run_folder, self.step, self.run_config(), self.adapter, self.optimizer,
                             self.boundary, self.scaler, self.losses,
                             extra={"fingerprint": self.data.fingerprint, "dataset_size": len(self.data)})
        return run_state.save_snapshot(self.run_folder, self.stem, self.step, self.adapter.file_tensors(),
                                       self._metadata())

    def _setup_training(self, saved):
        config = self.config
        self.device = comfy.model_management.get_torch_device()
        self.dtype = config.compute_dtype(self.device)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.adapter = self._initial_adapter(saved, self.generator)
        self.adapter.to(self.device, torch.float32)
        self.adapter.requires_grad_(True)
        self.condition = Condition(self.base, self.adapter, self.stem)
        self.order = torch.randperm(len(self.data), generator=self.generator)
        self.cursor, self.epoch = 0, 0
        shape = [config.batch_size * 2, *self.data.targets.shape[1:]]
        comfy.model_management.load_models_gpu([self.model, self.base.patcher],
                                               memory_required=self.model.model.memory_required(shape))
        prepare_frozen(self.objective.unet)
        prepare_frozen(self.base.model)
        self.optimizer = torch.optim.AdamW(self.adapter.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        # Loss scaling for fp16 compute, and on GPUs whenever half-precision weights sit in the gradient's path.
        half = self.dtype == torch.float16 or (self.device.type == "cuda" and self.dtype != torch.float32)
        self.scaler = torch.amp.GradScaler(self.device.type) if half else None
        if saved is not None:
            document, tensors = saved
            run_state.restore_optimizer(self.optimizer, document, tensors)
            self._set_rng_state(saved)
            if self.scaler is not None and document.get("scaler"):
                self.scaler.load_state_dict(document["scaler"])
            self.step = document["step"]
            self.losses = [tuple(x) for x in document.get("losses", [])]
        self.boundary = self._rng_state()

    def checkpointing(self):
        """The context steps run in: gradient checkpointing on the shared models while it is open, if asked for."""
        if not self.config.gradient_checkpointing:
            return contextlib.nullcontext()
        return gradient_checkpointing(checkpoint_targets(self.base.model, self.objective.unet))

    def _loop(self):
        config = self.config
        self.reporter.start(self.step, config.steps)
        with self.checkpointing():
            while self.step < config.steps:
                loss = self.train_step()
                self.step += 1
                self.losses.append((self.step, loss))
                self.boundary = self._rng_state()
                self.reporter.step(self.step, config.steps, loss)
                if config.save_every and self.step % config.save_every == 0 and self.step < config.steps:
                    self.save_state()

    def _finish(self):
        """Writes the output LoRA; the run's state is dropped only once the file exists."""
        tensors = self.adapter.file_tensors()
        try:
            save_lora_file(tensors, self.output_path, self._metadata())
        except Exception:
            self.save_state()  # keep the finished weights resumable if the output cannot be written
            raise
        run_state.remove_state(self.run_folder)
        if os.path.isdir(self.run_folder) and not os.listdir(self.run_folder):
            os.rmdir(self.run_folder)
        final = ConditionAdapter({n: t.detach().to("cpu", torch.float32).clone()
                                  for n, t in zip(self.adapter.names, self.adapter.tensors)}, self.adapter.rank)
        final.to(dtype=self.base.dtype)
        return Condition(self.base, final, os.path.basename(self.output_path))

    def _check_run_folder(self, saved):
        if saved is None and os.path.isdir(self.run_folder) and os.listdir(self.run_folder):
            raise CtrLoRAError(
                f"Train CtrLoRA: {self.run_folder} holds files of an earlier run of '{self.stem}' but no state to "
                "resume; choose another output name, or move that folder away (nothing is overwritten).")

    def prepare(self):
        """Checks the inputs, encodes the dataset once, and sets up the models, the optimizer and the random state
        (restored from the saved run when resuming). Everything it creates is a normal tensor, also when ComfyUI
        runs the node under inference mode."""
        with torch.inference_mode(False), torch.enable_grad():
            self._prepare()
        return self

    def _prepare(self):
        self.config.validate()
        run_state.check_new_output(self.output_path)
        pairs, self.dataset_report = scan(self.dataset_folder, self.template, self.name_pattern)
        saved = self._saved_run()
        self._check_run_folder(saved)
        self.objective = NoisePrediction(self.model, self.base)
        self.base.model.set_attention_heads(self.model.model.model_config.unet_config)
        check_resolution(self.model, self.vae, self.config.resolution, "Train CtrLoRA")
        data = self._encode(pairs, self.dataset_report)
        self.objective.check_compatible(data.hints.shape[1], data.contexts[0].shape[-1])
        if saved is not None and saved[0].get("fingerprint") != data.fingerprint:
            raise CtrLoRAError(
                f"Train CtrLoRA: resume: the dataset differs from the saved run's "
                f"({saved[0].get('dataset_size')} pairs then, {len(data)} now, or other files/prompts). "
                "Restore it, or turn resume off and pick another output name.")
        self._setup_training(saved)
        if saved is not None:
            self.notes.append(f"resumed at step {self.step}")

    def run(self):
        try:
            self.prepare()
            with torch.inference_mode(False), torch.enable_grad():
                condition = self._train_and_save()
        except comfy.model_management.InterruptProcessingException:
            self.reporter.finished("cancelled", self.step, self.config.steps, self.notes[-1] if self.notes else "")
            raise
        except Exception as e:
            self.reporter.finished("error", self.step, self.config.steps, str(e).splitlines()[0] if str(e) else "")
            raise
        self.reporter.finished("done", self.step, self.config.steps, self.output_path)
        final_loss = f", final loss {self.losses[-1][1]:.5f}" if self.losses else ""
        lines = [f"Saved {self.output_path} (rank {self.adapter.rank}, {self.step} steps{final_loss}).",
                 self.dataset_report.summary(), *self.notes]
        return TrainResult(condition, self.output_path, self.step, list(self.losses), "\n".join(lines))

    def _train_and_save(self):
        try:
            self._loop()
        except comfy.model_management.InterruptProcessingException:
            path = self.save_state()
            self.notes.append(f"cancelled at step {self.step}; saved {path}; queue again with resume on to continue")
            logging.info("Train CtrLoRA: %s", self.notes[-1])
            raise
        except Exception:
            if not self.in_update and self.step > 0:
                try:
                    self.save_state()
                except Exception as save_error:
                    logging.error("Train CtrLoRA: could not save the state after an error: %s", save_error)
            raise
        return self._finish()
