"""Preview images during training: the current condition sampled with ComfyUI's own sampler on fixed inputs.

Each preview point samples the same items (held-out condition images with their prompts, or an image the user
gives) with the same seed, so the strips saved at successive steps show what the LoRA has learnt. Files:
``<run folder>/previews/step000250.png`` (one strip: the items side by side) and, at the end, ``grid.png``
(one row per item: condition | target | preview at each point), built from the strips on disk so a resumed run's
grid includes the points before its interruption.
"""
import dataclasses
import glob
import os
import re

import numpy as np
import torch
from PIL import Image

import comfy.sample

from ..ctrlora_core import Condition, apply_control
from ..ctrlora_core.atomic import write_replace

MAX_ITEMS = 2
_STRIP = re.compile(r"step(\d+)\.png$")


@dataclasses.dataclass
class PreviewSettings:
    every: int = 0  # steps between previews; 0: none
    sampler: str = "ddim"
    scheduler: str = "normal"
    steps: int = 10
    cfg: float = 7.5
    seed: int = 0


@dataclasses.dataclass
class PreviewItem:
    hint: torch.Tensor  # [1, C, h, w] condition latent as VAE Condition Encode gives it (unscaled)
    context: torch.Tensor  # [1, tokens, dim] the prompt's embedding
    condition: torch.Tensor  # [H, W, 3] the condition image, for the grid
    target: torch.Tensor  # [H, W, 3], black where there is none


def items_from_dataset(data, latent_format, images, count=MAX_ITEMS):
    """Preview items from an ``EncodedDataset`` (its first ``count`` pairs); ``images(name)`` gives a pair's
    (condition, target) pictures."""
    items = []
    for i in range(min(count, len(data))):
        condition, target = images(data.names[i])
        items.append(PreviewItem(latent_format.process_out(data.hints[i:i + 1]),
                                 data.contexts[int(data.prompt_ids[i])], condition, target))
    return items


def items_from_image(image, hint, context):
    """Preview items for a user's condition IMAGE batch (no target) encoded as ``hint`` with prompt ``context``."""
    return [PreviewItem(hint[i:i + 1], context, image[i, ..., :3], torch.zeros_like(image[i, ..., :3]))
            for i in range(min(MAX_ITEMS, image.shape[0]))]


class Previewer:
    def __init__(self, model, base, vae, items, empty_context, settings, folder):
        self.model, self.base, self.vae = model, base, vae
        self.items, self.empty_context = items, empty_context
        self.settings = settings
        self.folder = os.path.join(folder, "previews")

    def due(self, step, total):
        every = self.settings.every
        return bool(self.items) and every > 0 and (step % every == 0 or step == total)

    def sample(self, adapter, step):
        """Samples every item with a frozen copy of ``adapter``; saves the strip; returns it ([H, n*W, 3])."""
        condition = Condition(self.base, adapter.frozen_copy(self.base.dtype), f"preview@{step}")
        s = self.settings
        pictures = []
        with torch.no_grad():
            for item in self.items:
                positive, negative = apply_control([[item.context, {}]], [[self.empty_context, {}]], condition,
                                                   item.hint, 1.0, 0.0, 1.0)
                latent = torch.zeros_like(item.hint)
                noise = comfy.sample.prepare_noise(latent, s.seed)
                samples = comfy.sample.sample(self.model, noise, s.steps, s.cfg, s.sampler, s.scheduler, positive,
                                              negative, latent, disable_pbar=True, seed=s.seed)
                pictures.append(self.vae.decode(samples)[0, ..., :3].float().cpu().clamp(0, 1))
        strip = torch.cat(pictures, dim=1)
        os.makedirs(self.folder, exist_ok=True)
        _save_png(strip, os.path.join(self.folder, f"step{step:06d}.png"))
        return strip

    def grid(self):
        """``[1, H', W', 3]``: one row per item, condition | target | preview at each saved point; None without
        previews. Also saved as ``grid.png``."""
        strips = sorted((int(_STRIP.search(p).group(1)), p)
                        for p in glob.glob(os.path.join(self.folder, "step*.png")) if _STRIP.search(p))
        if not strips or not self.items:
            return None
        loaded = [torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0)
                  for _, p in strips]
        rows = []
        for i, item in enumerate(self.items):
            height, width = item.condition.shape[:2]
            cells = [item.condition, item.target] + [s[:height, i * width:(i + 1) * width] for s in loaded]
            rows.append(torch.cat([_fit(c, height, width) for c in cells], dim=1))
        grid = torch.cat(rows, dim=0)
        _save_png(grid, os.path.join(self.folder, "grid.png"))
        return grid.unsqueeze(0)


def _fit(image, height, width):
    """Pads or crops an image to ``height`` x ``width`` (decoded previews can differ by the VAE's rounding)."""
    out = torch.zeros(height, width, 3)
    h, w = min(height, image.shape[0]), min(width, image.shape[1])
    out[:h, :w] = image[:h, :w, :3]
    return out


def _save_png(image, path):
    picture = Image.fromarray((image.numpy() * 255).round().astype(np.uint8))
    write_replace(path, lambda temp: picture.save(temp, format="PNG"))
