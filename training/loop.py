"""Training a condition LoRA: the official recipe (frozen UNet and base; LoRA on every Linear plus the condition's
own zero convs, middle_block_out and transformer norms; AdamW; noise-prediction MSE; prompt dropout), run fast
(latents and prompt embeddings encoded once; mixed precision on GPUs), visibly (loss, held-out loss, previews),
cancellably and resumably, and failing loudly (see ``precision.Updater``) while keeping its last save.

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

from ..ctrlora_core import Condition, ConditionAdapter, CtrLoRAError, encode_condition
from ..ctrlora_core.atomic import remove_leftovers
from ..ctrlora_core.checkpoint import load_state_dict, save_lora_file
from . import state as run_state
from .checkpointing import checkpoint_targets, gradient_checkpointing
from .dataset import load_image, scan
from .encode import encode_dataset, fingerprint
from .frozen import prepare_frozen
from .memory import training_memory_required
from .objective import NoisePrediction
from .precision import PRECISIONS, Updater, choose_precision
from .previews import Previewer, PreviewSettings, items_from_dataset, items_from_image
from .progress import ComfyReporter
from .schedule import SCHEDULES, lr_factor, set_lr
from .validation import Validator, split

RANK_RANGE = (1, 1024)
RESOLUTION_RANGE = (32, 2048)
LABEL = "Train CtrLoRA"


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
    precision: str = "auto"  # see precision.choose_precision
    weight_decay: float = 0.01  # torch.optim.AdamW's default, as the official training
    lr_schedule: str = "constant"  # official: constant
    warmup_steps: int = 0
    validation_fraction: float = 0.05  # of the pairs, held out (at least 1, at most validation.MAX_PAIRS)
    validate_every: int = 100
    keep_snapshots: int = 3  # intermediate LoRA files kept in the run folder (the newest)

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
            (self.lr_schedule in SCHEDULES, f"lr_schedule must be one of {', '.join(SCHEDULES)} "
                                            f"(got {self.lr_schedule!r})"),
            (0 <= self.warmup_steps < self.steps or self.warmup_steps == 0,
             f"warmup_steps must be 0 or fewer than steps (got {self.warmup_steps} of {self.steps})"),
            (0 <= self.validation_fraction < 1, f"validation_fraction must be in [0, 1) (got {self.validation_fraction})"),
            (self.validate_every >= 0, f"validate_every must be 0 (never) or more (got {self.validate_every})"),
            (self.keep_snapshots >= 0, f"keep_snapshots must be 0 or more (got {self.keep_snapshots})"),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise CtrLoRAError(f"{LABEL}: " + "; ".join(problems) + ".")

    def advice(self):
        """What to try when a step fails, in this run's settings."""
        return (f"a lower learning_rate (now {self.lr:g}), precision fp32 (start ComfyUI with --fp32-unet), or "
                f"gradient_checkpointing {'off' if self.gradient_checkpointing else 'on'}")


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
        "dataset_size": run["dataset_size"], "validation_pairs": run["validation_pairs"],
        "prompt_template": run["template"], "resolution": config.resolution, "learning_rate": config.lr,
        "lr_schedule": config.lr_schedule, "warmup_steps": config.warmup_steps, "batch_size": config.batch_size,
        "grad_accum": config.grad_accum, "prompt_dropout": config.prompt_dropout, "seed": config.seed,
        "precision": run["precision"], "start_from": run["start_from"] or "",
        "validation_losses": run["validation_losses"], "skipped_steps": run["skipped_steps"],
        "train_config": run["train_config"], "dataset_fingerprint": run["fingerprint"],
        "trainer": "comfyui-ctrlora Train CtrLoRA",
    }


@dataclasses.dataclass
class TrainResult:
    condition: Condition
    path: str
    steps: int
    losses: list
    report: str
    validation_losses: list = dataclasses.field(default_factory=list)
    preview_grid: torch.Tensor = None  # [1, H, W, 3] condition | target | previews, or None
    reused: bool = False


class Trainer:
    """One training run; ``run()`` returns a ``TrainResult`` only after the output file is written (or, when the
    output exists from the same settings, base and data, after loading it)."""

    def __init__(self, model, base, vae, encode_prompt, dataset_folder, output_folder, output_name, config,
                 template="", name_pattern="", start_from=None, resume=True, reporter=None, previews=None,
                 preview_image=None):
        self.model, self.base, self.vae, self.encode_prompt = model, base, vae, encode_prompt
        self.dataset_folder, self.template, self.name_pattern = dataset_folder, template, name_pattern
        self.config = config
        self.start_from = start_from
        self.resume = resume
        self.preview_settings = previews or PreviewSettings()
        self.preview_image = preview_image
        self.output_path, self.run_folder = run_state.output_paths(output_folder, output_name)
        self.stem = os.path.basename(self.output_path)[:-len(run_state.LORA_EXTENSION)]
        self.reporter = reporter or ComfyReporter(output=self.stem)
        self.notes = []
        self.losses = []
        self.validation_losses = []
        self.step = 0
        self.data = None
        self.validator = None
        self.previewer = None
        self.dataset_report = None
        self.fingerprint = None
        self.reused = None
        self.prepared = False
        self.in_update = False

    # --- setup ------------------------------------------------------------------------------------------------------
    def run_config(self):
        """The settings a resume must match (see ``state.RUN_DEFINING``), plus informative ones."""
        return {
            **dataclasses.asdict(self.config), "base": self.base.name, "template": self.template,
            "name_pattern": self.name_pattern,
            "start_from": os.path.basename(self.start_from) if self.start_from else None,
            # The cosine schedule's shape depends on the total.
            "schedule_steps": self.config.steps if self.config.lr_schedule != "constant" else None,
        }

    def _saved_run(self):
        if not run_state.has_state(self.run_folder):
            return None
        if not self.resume:
            raise CtrLoRAError(
                f"{LABEL}: a saved run of '{self.stem}' exists in {self.run_folder}. Turn resume on to continue "
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
                raise CtrLoRAError(f"{LABEL}: start_from {name} has rank {adapter.rank} but rank is set to "
                                   f"{self.config.rank}; set rank to {adapter.rank} to continue training it.")
        else:
            norms = [n for n in self.base.absent if "norm" in n]
            if norms:
                raise CtrLoRAError(
                    f"{LABEL}: {self.base.name} has no norm weights ({len(norms)} missing, e.g. {norms[0]}): a "
                    "stripped base file. A new condition would start with zero norms and learn nothing. Load the "
                    "full base file, or set start_from to a condition LoRA of this base to take its norms.")
            adapter = ConditionAdapter.fresh(model, self.config.rank, generator)
        return adapter

    def _encode(self, pairs, report):
        latent_format = self.model.model.latent_format
        data = encode_dataset(
            pairs, report, self.vae, self.encode_prompt, latent_format, self.config.resolution,
            on_progress=self.reporter.encoding, check_cancel=self.reporter.check_cancel,
        )
        self.data, held_out = split(data, self.config.validation_fraction)
        if held_out is not None:
            self.validator = Validator(self.objective, held_out, self.config.seed)
        self.pairs_by_name = {p.name: p for p in pairs}
        return self.data

    def _pair_images(self, name):
        pair = self.pairs_by_name[name]
        return load_image(pair.source, self.config.resolution), load_image(pair.target, self.config.resolution)

    def _previewer(self):
        """What the previews sample: the user's image, else held-out pairs, else the first training pairs."""
        latent_format = self.model.model.latent_format
        if self.preview_image is not None:
            with torch.no_grad():
                hint = encode_condition(self.vae, self.preview_image).float()
            items = items_from_image(self.preview_image, hint, self.data.contexts[0])
        else:
            source = self.validator.data if self.validator is not None else self.data
            items = items_from_dataset(source, latent_format, self._pair_images)
        return Previewer(self.model, self.base, self.vae, items, self.data.contexts[0], self.preview_settings,
                         self.run_folder)

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
        """One optimizer step over ``grad_accum`` micro-batches; returns the mean loss. A non-finite loss raises
        before any weight changes (the chart gets the point)."""
        config, step = self.config, self.step + 1
        total = 0.0
        for _ in range(config.grad_accum):
            self.reporter.check_cancel()
            batch = self.make_batch(*self.draw())
            with self.updater.autocast():
                loss = self.objective.loss(self.condition, **batch)
            value = loss.item()
            if not torch.isfinite(loss):
                self.reporter.step(step, config.steps, value, skipped=self.updater.skipped)
                self.updater.check_loss(value, step)
            self.updater.backward(loss, config.grad_accum)
            total += value / config.grad_accum
        set_lr(self.optimizer, config.lr * lr_factor(step, config.steps, config.warmup_steps, config.lr_schedule))
        self.in_update = True
        self.updater.step(step)
        self.in_update = False
        return total

    def _metadata(self):
        return lora_metadata(self.config, {
            "rank": self.adapter.rank, "base": self.base.name, "step": self.step, "dataset_size": len(self.data),
            "validation_pairs": len(self.validator.data) if self.validator else 0,
            "template": self.template, "start_from": self.run_config()["start_from"],
            "precision": self.precision.describe(), "skipped_steps": self.updater.skipped,
            "validation_losses": run_state.to_json_text(self.validation_losses),
            "train_config": run_state.to_json_text(self.run_config()), "fingerprint": self.fingerprint,
        })

    def save_state(self):
        """Saves the resumable state and an intermediate LoRA at the current step boundary (older intermediate
        LoRAs beyond ``keep_snapshots`` are removed)."""
        run_state.save_state(self.run_folder, self.step, self.run_config(), self.adapter, self.optimizer,
                             self.boundary, self.updater.state(), self.losses,
                             extra={"fingerprint": self.fingerprint, "dataset_size": len(self.data),
                                    "validation_losses": [list(x) for x in self.validation_losses]})
        path = run_state.save_snapshot(self.run_folder, self.stem, self.step, self.adapter.file_tensors(),
                                       self._metadata())
        run_state.prune_snapshots(self.run_folder, self.config.keep_snapshots, keep=path)
        return path

    def _setup_training(self, saved):
        config = self.config
        self.device = comfy.model_management.get_torch_device()
        self.precision = choose_precision(config.precision, self.device,
                                          (self.objective.unet_dtype, self.base.compute_dtype), LABEL)
        if self.precision.note:
            self.notes.append(self.precision.note)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.adapter = self._initial_adapter(saved, self.generator)
        self.adapter.to(self.device, torch.float32)
        self.adapter.requires_grad_(True)
        self.condition = Condition(self.base, self.adapter, self.stem)
        self.order = torch.randperm(len(self.data), generator=self.generator)
        self.cursor, self.epoch = 0, 0
        # Before ComfyUI loads them: never replace parameters it has already moved or pinned.
        prepare_frozen(self.model.model)
        prepare_frozen(self.base.model)
        # Room for the backward pass too, not just ComfyUI's inference estimate (see memory.py).
        required = training_memory_required(self.objective, self.base, [config.batch_size, *self.data.targets.shape[1:]],
                                            self.precision.compute, config.gradient_checkpointing, self.adapter)
        comfy.model_management.load_models_gpu([self.model, self.base.patcher], memory_required=required)
        self.optimizer = torch.optim.AdamW(self.adapter.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.updater = Updater(self.precision, self.optimizer, LABEL, config.advice())
        if saved is not None:
            document, tensors = saved
            run_state.restore_optimizer(self.optimizer, document, tensors)
            self._set_rng_state(saved)
            self.updater.load_state(document.get("updater") or {})
            self.step = document["step"]
            self.losses = [tuple(x) for x in document.get("losses", [])]
            self.validation_losses = [tuple(x) for x in document.get("validation_losses", [])]
        self.boundary = self._rng_state()
        self.previewer = self._previewer()

    def checkpointing(self):
        """The context steps run in: gradient checkpointing on the shared models while it is open, if asked for."""
        if not self.config.gradient_checkpointing:
            return contextlib.nullcontext()
        return gradient_checkpointing(checkpoint_targets(self.base.model, self.objective.unet))

    def _validate(self):
        """Held-out loss at the current weights (recorded and returned), or None when not due."""
        every = self.config.validate_every
        if self.validator is None or not every or (self.step % every and self.step != self.config.steps):
            return None
        value = self.validator.loss(self.condition, self.device, self.updater.autocast)
        self.validation_losses.append((self.step, value))
        return value

    def _preview(self):
        if self.previewer is not None and self.previewer.due(self.step, self.config.steps):
            strip = self.previewer.sample(self.adapter, self.step)
            self.reporter.preview(self.step, self.config.steps, strip)

    def _loop(self):
        config = self.config
        self.reporter.start(self.step, config.steps)
        with self.checkpointing():
            while self.step < config.steps:
                loss = self.train_step()
                self.step += 1
                self.losses.append((self.step, loss))
                self.boundary = self._rng_state()
                validation = self._validate()
                self.reporter.step(self.step, config.steps, loss, validation=validation,
                                   skipped=self.updater.skipped)
                self._preview()
                if config.save_every and self.step % config.save_every == 0 and self.step < config.steps:
                    self.save_state()
        self.updater.check_finished()

    def _finish(self):
        """Writes the output LoRA; the run's state is dropped only once the file exists."""
        tensors = self.adapter.file_tensors()
        try:
            save_lora_file(tensors, self.output_path, self._metadata())
        except Exception:
            self.save_state()  # keep the finished weights resumable if the output cannot be written
            raise
        run_state.remove_state(self.run_folder)
        run_state.prune_snapshots(self.run_folder, self.config.keep_snapshots)
        if os.path.isdir(self.run_folder) and not os.listdir(self.run_folder):
            os.rmdir(self.run_folder)
        final = self.adapter.frozen_copy(self.base.dtype, "cpu")
        return Condition(self.base, final, os.path.basename(self.output_path))

    def _check_run_folder(self, saved):
        if saved is None and os.path.isdir(self.run_folder) and os.listdir(self.run_folder):
            raise CtrLoRAError(
                f"{LABEL}: {self.run_folder} holds files of an earlier run of '{self.stem}' but no state to "
                "resume; choose another output name, or move that folder away (nothing is overwritten).")

    def prepare(self):
        """Checks the inputs, encodes the dataset once, and sets up the models, the optimizer and the random state
        (restored from the saved run when resuming). Everything it creates is a normal tensor, also when ComfyUI
        runs the node under inference mode. When the output exists from this very run, loads it instead."""
        with torch.inference_mode(False), torch.enable_grad():
            self._prepare()
        self.prepared = True
        return self

    def _prepare(self):
        self.config.validate()
        pairs, self.dataset_report = scan(self.dataset_folder, self.template, self.name_pattern)
        self.fingerprint = fingerprint(pairs, self.config.resolution)
        if os.path.lexists(self.output_path):
            self.reused = run_state.reuse_output(self.output_path, self.run_config(), self.fingerprint, LABEL)
            return
        remove_leftovers(self.run_folder)  # of a save a killed process did not finish
        saved = self._saved_run()
        self._check_run_folder(saved)
        self.objective = NoisePrediction(self.model, self.base)
        self.base.model.set_attention_heads(self.model.model.model_config.unet_config)
        check_resolution(self.model, self.vae, self.config.resolution, LABEL)
        data = self._encode(pairs, self.dataset_report)
        self.objective.check_compatible(data.hints.shape[1], data.contexts[0].shape[-1])
        if saved is not None and saved[0].get("fingerprint") != self.fingerprint:
            raise CtrLoRAError(
                f"{LABEL}: resume: the dataset differs from the saved run's "
                f"({saved[0].get('dataset_size')} pairs then, {len(data)} now, or other files/prompts). "
                "Restore it, or turn resume off and pick another output name.")
        self._setup_training(saved)
        if saved is not None:
            self.notes.append(f"resumed at step {self.step}")

    def _reused_result(self):
        tensors = load_state_dict(self.output_path)
        name = os.path.basename(self.output_path)
        adapter = ConditionAdapter.from_file_tensors(tensors, self.base.model, name)
        adapter.to(dtype=self.base.dtype)
        steps = int(self.reused.get("steps", 0))
        report = (f"{name} already exists from this run's settings, base and dataset: loaded it without training "
                  f"({steps} steps). Change output_name to train again.")
        self.reporter.finished("reused", steps, steps, report)
        return TrainResult(Condition(self.base, adapter, name), self.output_path, steps, [], report,
                           validation_losses=run_state.from_json_text(self.reused.get("validation_losses")),
                           reused=True)

    def run(self):
        try:
            if not self.prepared:
                self.prepare()
            if self.reused is not None:
                return self._reused_result()
            with torch.inference_mode(False), torch.enable_grad():
                condition = self._train_and_save()
                grid = self.previewer.grid() if self.previewer is not None else None
        except comfy.model_management.InterruptProcessingException:
            self.reporter.finished("cancelled", self.step, self.config.steps, "saved; queue again with resume on")
            raise
        except Exception as e:
            self.reporter.finished("error", self.step, self.config.steps, str(e).splitlines()[0] if str(e) else "")
            raise
        self.reporter.finished("done", self.step, self.config.steps, os.path.basename(self.output_path))
        return TrainResult(condition, self.output_path, self.step, list(self.losses), self._report(),
                           validation_losses=list(self.validation_losses), preview_grid=grid)

    def _report(self):
        final_loss = f", final loss {self.losses[-1][1]:.5f}" if self.losses else ""
        lines = [f"Saved {self.output_path} (rank {self.adapter.rank}, {self.step} steps{final_loss}, "
                 f"{self.precision.describe()}).", self.dataset_report.summary()]
        if self.validator is not None:
            points = ", ".join(f"{v:.5f} at step {s}" for s, v in self.validation_losses[-3:])
            lines.append(f"Held-out loss ({len(self.validator.data)} pairs): {points or 'not measured'}.")
        if self.updater.skipped:
            lines.append(f"{self.updater.skipped} of {self.step} steps were skipped by the fp16 loss scaler "
                         "(non-finite gradients; the scale adapts).")
        if os.path.isdir(self.run_folder):
            lines.append(f"Run folder {self.run_folder}: {run_state.disk_usage(self.run_folder) / 2**20:.1f} MiB "
                         "(intermediate LoRAs, previews).")
        return "\n".join(lines + self.notes)

    def _keep_last_save(self):
        if not self.in_update and self.step > 0:
            try:
                return self.save_state()
            except Exception as save_error:
                logging.error("%s: could not save the state after an error: %s", LABEL, save_error)
        return None

    def _train_and_save(self):
        try:
            self._loop()
        except comfy.model_management.InterruptProcessingException:
            path = self.save_state()
            self.notes.append(f"cancelled at step {self.step}; saved {path}; queue again with resume on to continue")
            logging.info("%s: %s", LABEL, self.notes[-1])
            raise
        except torch.OutOfMemoryError as e:
            comfy.model_management.soft_empty_cache(True)
            path = self._keep_last_save()
            kept = f"the run keeps its save at step {self.step} ({os.path.basename(path)})" if path else \
                "nothing was saved yet"
            raise CtrLoRAError(
                f"{LABEL}: out of GPU memory at step {self.step + 1} (resolution {self.config.resolution}, batch "
                f"{self.config.batch_size}); {kept}. Lower resolution or batch_size (raise grad_accumulation to "
                f"keep the batch), turn gradient_checkpointing on, or start ComfyUI with --lowvram; then queue "
                "again with resume on.") from e
        except Exception:
            self._keep_last_save()
            raise
        return self._finish()
