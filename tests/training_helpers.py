"""Tiny datasets, text encoders and models for the training tests (CPU, 32 px images)."""
import dataclasses
import importlib
import json
import math
import os

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

import comfy.latent_formats
import comfy.model_management
import comfy.model_patcher
import comfy.sd

import tiny
from tiny import prompt_encoder, tiny_clip  # noqa: F401 (re-exported for the tests)
from conftest import pack

training = importlib.import_module(f"{pack.__name__}.training")
objective = importlib.import_module(f"{pack.__name__}.training.objective")
core = pack.ctrlora_core

SIZE = 32  # pixels; the tiny VAE downsamples by 2 -> 16x16 latents
RED, BLUE = np.array([230, 40, 20]), np.array([20, 60, 180])


def white_on_black(cells):
    return np.where(cells[..., None], 255, 0).astype(np.uint8).repeat(3, 2)


def pattern_pair(rng, size=SIZE, cell=4, render=white_on_black):
    """A condition that determines its target: a random cell pattern drawn by ``render`` (boolean pixel mask ->
    RGB uint8; default black/white), and the same pattern in red on blue."""
    cells = rng.integers(0, 2, (size // cell, size // cell)).repeat(cell, 0).repeat(cell, 1).astype(bool)
    target = np.where(cells[..., None], RED, BLUE).astype(np.uint8)
    return render(cells), target


def write_pairs(folder, count, seed=0, names=None, size=SIZE, render=white_on_black):
    """A source/ + target/ dataset of ``count`` pattern pairs named ``names`` (default item_0000 ...)."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "source"), exist_ok=True)
    os.makedirs(os.path.join(folder, "target"), exist_ok=True)
    names = names or [f"item_{i:04d}" for i in range(count)]
    for name in names:
        condition, target = pattern_pair(rng, size, render=render)
        Image.fromarray(condition).save(os.path.join(folder, "source", name + ".png"))
        Image.fromarray(target).save(os.path.join(folder, "target", name + ".png"))
    return folder


def write_prompt_json(folder, entries):
    with open(os.path.join(folder, "prompt.json"), "w") as f:
        for entry in entries:
            f.write((entry if isinstance(entry, str) else json.dumps(entry)) + "\n")


def golden_base():
    return core.load_base(os.path.join(tiny.GOLDEN, "base.ckpt"))


def config(**overrides):
    values = dict(rank=4, steps=6, batch_size=2, lr=1e-3, resolution=SIZE, save_every=0, seed=0)
    values.update(overrides)
    return training.TrainConfig(**values)


def trainer(model, base, vae, dataset, out, name="cond", encode=None, **kwargs):
    cfg = kwargs.pop("config", None) or config()
    kwargs.setdefault("reporter", training.ComfyReporter(output=name, min_interval=0.0))
    return training.Trainer(model, base, vae, encode or prompt_encoder(), str(dataset), str(out), name, cfg, **kwargs)


# --- a tiny SD model that has learnt the dataset's domain, for the learning test -------------------------------------

class UnitLatent(comfy.latent_formats.SD15):
    """The tiny VAE's latents scaled to unit variance, as SD1.5's 0.18215 does for its VAE."""

    def __init__(self):
        super().__init__(scale_factor=1.9)


class TinyUnitSD15(tiny.TinySD15):
    latent_format = UnitLatent


def standard_init_(module, seed):
    """SD-style init: fan-in scaled weights, norms at 1, and the residual branches' last layers at zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p[0].numel()))
            else:
                p.zero_()
        for name, sub in module.named_modules():
            if isinstance(sub, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and sub.weight is not None:
                sub.weight.fill_(1)
            if name.endswith(("out_layers.3", "proj_out")) or name == "out.2":
                for p in sub.parameters():
                    p.zero_()


def unit_latent_model(seed=0):
    config_ = TinyUnitSD15(tiny.TINY_UNET)
    config_.set_inference_dtype(torch.float32, None)
    model = config_.get_model({})
    standard_init_(model.diffusion_model, seed)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def pretrain_unet(model, data, steps, lr=1e-3, batch_size=8, seed=5):
    """Trains the tiny UNet itself, unconditionally (empty prompt), on the dataset's targets: a stand-in for a
    pretrained SD model that knows the domain but not where the pattern is."""
    unet = model.model.diffusion_model
    unet.requires_grad_(True)
    loss_of = training.NoisePrediction(model, None)
    optimizer = torch.optim.Adam(unet.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1 - i / steps)
    generator = torch.Generator().manual_seed(seed)
    context = data.contexts[0].repeat(batch_size, 1, 1)
    for _ in range(steps):
        ids = torch.randint(0, len(data), (batch_size,), generator=generator)
        timesteps = torch.randint(0, loss_of.num_timesteps, (batch_size,), generator=generator)
        noise = torch.randn(data.targets[ids].shape, generator=generator)
        loss = loss_of.loss(None, None, data.targets[ids], context, timesteps, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    unet.requires_grad_(False)
    return model


def base_from_unet(model, path):
    """A base ControlNet file made as the official one starts: a copy of the UNet's encoder. Its zero convs and
    middle_block_out are left out, so they load as zeros (a new condition starts with no control)."""
    tensors = {k: v.clone().contiguous() for k, v in model.model.diffusion_model.state_dict().items()
               if k.split(".")[0] in ("input_blocks", "middle_block", "time_embed")}
    safetensors.torch.save_file({"control_model." + k: v for k, v in tensors.items()}, str(path))
    return path


def held_out_batch(data, repeats=4, seed=123):
    """Held-out items repeated with fixed timesteps (a grid over the schedule) and fixed noise."""
    data = dataclasses.replace(data, hints=data.hints.repeat(repeats, 1, 1, 1),
                               targets=data.targets.repeat(repeats, 1, 1, 1), prompt_ids=data.prompt_ids.repeat(repeats))
    count = len(data)
    timesteps = torch.linspace(0, 999, count).round().long()
    noise = torch.randn(data.targets.shape, generator=torch.Generator().manual_seed(seed))
    return data, timesteps, noise


# --- fixtures and a reporter shared by the training test files (import them by name) ----------------------------------

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from a second thread, and lose a lot when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def dataset(tmp_path):
    return write_pairs(str(tmp_path / "data"), 8)


class Recorder(training.ComfyReporter):
    """Keeps every event the node would send (as JSON carries it: a NaN would fail here) and every preview."""

    def __init__(self):
        super().__init__(output="cond", min_interval=10.0)
        self.events, self.previews = [], []

    def _send(self, data):
        self.events.append(json.loads(json.dumps(data, allow_nan=False)))

    def preview(self, step, total, image):
        super().preview(step, total, image)
        self.previews.append((step, tuple(image.shape)))
