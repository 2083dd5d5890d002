"""Encode once, train many times: hint and target latents and prompt embeddings, cached for the whole run.

The official recipe re-encodes every target and hint with the VAE, and every prompt with CLIP, at every step. Here
each image is encoded once (the VAE's posterior mode, as ComfyUI's VAE Encode and the inference hint path) and each
distinct prompt once, plus the empty prompt used for prompt dropout.
"""
import dataclasses
import hashlib
import math
import os
import re

import torch

from ..ctrlora_core import CtrLoRAError, encode_condition
from .dataset import load_pair

EMPTY_PROMPT = ""


def clip_prompt_encoder(clip):
    """``prompt -> [1, tokens, channels]`` with a ComfyUI CLIP, as the official FrozenCLIPEmbedder encodes a caption:
    the raw text (ComfyUI's ``(word:1.2)`` weighting syntax is read as literal text) cut to CLIP's 77 tokens (start,
    the first 75 tokens, end): only the first of the 77-token windows CLIPTextEncode would encode."""
    def encode(prompt):
        tokens = clip.tokenize(_escape_backslashed_parentheses(prompt), disable_weights=True)
        return clip.encode_from_tokens({name: windows[:1] for name, windows in tokens.items()})
    return encode


def _escape_backslashed_parentheses(text):
    """ComfyUI's tokenizer reads ``\\(`` as an escaped ``(`` even with weights disabled; one more backslash keeps
    the caption's backslash."""
    return re.sub(r"\\(?=[()])", r"\\\\", text)


def encode_images(vae, latent_format, condition, target):
    """The latents a step trains on: ``(hint, x0)`` as the ControlNet and the UNet see them (``process_in`` applied).

    ``condition`` and ``target`` are ComfyUI IMAGE batches. The hint goes through ``encode_condition`` exactly as
    'VAE Condition Encode' does at inference; the target through ``vae.encode`` as 'VAE Encode' does.
    """
    hint = latent_format.process_in(encode_condition(vae, condition).float())
    x0 = latent_format.process_in(vae.encode(target[..., :3]).float())
    return hint, x0


@dataclasses.dataclass
class EncodedDataset:
    hints: torch.Tensor  # [N, C, h, w], float32, CPU
    targets: torch.Tensor  # [N, C, h, w]
    prompt_ids: torch.Tensor  # [N] index into contexts
    contexts: list  # [1, tokens, dim] per distinct prompt; contexts[0] is the empty prompt
    prompts: list  # the distinct prompts, same order
    names: list  # pair names, same order as hints

    def __len__(self):
        return self.hints.shape[0]

    def context_batch(self, ids, device, dtype):
        """Contexts of ``ids`` as one batch; different token lengths are repeated to their least common multiple,
        as ComfyUI batches conditionings."""
        items = [self.contexts[i] for i in ids.tolist()]
        length = math.lcm(*(c.shape[1] for c in items))
        return torch.cat([c.repeat(1, length // c.shape[1], 1) for c in items]).to(device, dtype)


class PromptCache:
    def __init__(self, encode_prompt):
        self.encode_prompt = encode_prompt
        self.ids = {}
        self.contexts = []

    def id(self, prompt):
        if prompt not in self.ids:
            context = self.encode_prompt(prompt)
            if context.ndim != 3 or context.shape[0] != 1:
                raise CtrLoRAError(f"Train CtrLoRA: the text encoder returned shape {tuple(context.shape)} for a "
                                   "prompt; expected [1, tokens, channels].")
            self.ids[prompt] = len(self.contexts)
            self.contexts.append(context.detach().to("cpu", torch.float32).clone())
        return self.ids[prompt]


def fingerprint(pairs, resolution):
    """Identifies the data a run trains on (names, prompts, file sizes, resolution) so a resume can check it."""
    digest = hashlib.sha256(f"resolution={resolution}".encode())
    for pair in pairs:
        for path in (pair.source, pair.target):
            digest.update(f"|{pair.name}|{pair.prompt}|{os.path.basename(path)}|{_size(path)}".encode())
    return digest.hexdigest()[:32]


def _size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


def encode_pairs(pairs, report, vae, prompts, latent_format, resolution, chunk=8, on_progress=None, check_cancel=None):
    """Loads, resizes and encodes ``pairs``; unreadable ones are skipped (and counted in ``report``).

    ``prompts``: the ``PromptCache`` the prompt ids refer to. Returns ``(hints, targets, prompt_ids, kept)``:
    ``hints``/``targets`` ``[len(kept), C, h, w]`` on the CPU (None when no pair could be read), ``kept`` the pairs
    used. ``on_progress(done, total)`` and ``check_cancel()`` are called between chunks of ``chunk`` pairs.
    """
    with torch.no_grad():
        hints, targets, ids, kept = [], [], [], []
        for start in range(0, len(pairs), chunk):
            if check_cancel is not None:
                check_cancel()
            loaded = [(pair, load_pair(pair, resolution, report)) for pair in pairs[start:start + chunk]]
            loaded = [(pair, images) for pair, images in loaded if images is not None]
            if loaded:
                condition = torch.stack([images[0] for _, images in loaded])
                target = torch.stack([images[1] for _, images in loaded])
                hint, x0 = encode_images(vae, latent_format, condition, target)
                hints.append(hint.cpu())
                targets.append(x0.cpu())
                for pair, _ in loaded:
                    ids.append(prompts.id(pair.prompt))
                    kept.append(pair)
            if on_progress is not None:
                on_progress(min(start + chunk, len(pairs)), len(pairs))
    if not kept:
        return None, None, torch.zeros(0, dtype=torch.long), kept
    return torch.cat(hints), torch.cat(targets), torch.tensor(ids, dtype=torch.long), kept


def check_prompt_widths(prompts):
    dims = {c.shape[-1] for c in prompts.contexts}
    if len(dims) != 1:
        raise CtrLoRAError(f"Train CtrLoRA: the text encoder gave embeddings of different widths {sorted(dims)}.")


def encode_dataset(pairs, report, vae, encode_prompt, latent_format, resolution, chunk=8, on_progress=None,
                   check_cancel=None):
    """Loads, resizes and encodes every pair once. Unreadable pairs are skipped (and counted in ``report``).

    ``on_progress(done, total)`` and ``check_cancel()`` are called between chunks of ``chunk`` pairs.
    """
    prompts = PromptCache(encode_prompt)
    with torch.no_grad():
        prompts.id(EMPTY_PROMPT)
    hints, targets, ids, kept = encode_pairs(pairs, report, vae, prompts, latent_format, resolution, chunk,
                                             on_progress, check_cancel)
    report.used = len(kept)
    if not kept:
        raise CtrLoRAError(f"Train CtrLoRA: no pair could be read.\n{report.summary()}")
    check_prompt_widths(prompts)
    return EncodedDataset(
        hints=hints, targets=targets, prompt_ids=ids, contexts=prompts.contexts, prompts=list(prompts.ids),
        names=[p.name for p in kept],
    )
