"""Reading and writing CtrLoRA checkpoint files in the official layouts.

Official files are flat dicts of ``control_model.*`` tensors (``.ckpt`` pickles, sometimes inside a
``{"state_dict": ...}`` wrapper) or ``.safetensors``. A base file carries the shared ControlNet weights;
a condition LoRA file carries only the tensors that belong to one condition (see ``is_per_condition_key``).
"""
import os
import pickle

import safetensors.torch
import torch

import comfy.utils

from .atomic import write_new
from .errors import CtrLoRAError

PREFIX = "control_model."
# Substrings that mark a tensor as belonging to one condition (official api.CtrLoRA.check_key).
PER_CONDITION_MARKERS = ("lora_layer", "zero_convs", "middle_block_out", "norm")


def is_per_condition_key(key):
    return any(marker in key for marker in PER_CONDITION_MARKERS)


def load_state_dict(path):
    """Loads a ``.ckpt``/``.pt``/``.safetensors`` file as ``{key without control_model.: tensor}``.

    ``.ckpt`` files are read with ``weights_only=True``: a file that needs arbitrary unpickling is refused.
    """
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise CtrLoRAError(f"{name}: file not found ({path}).")
    if os.path.getsize(path) == 0:
        raise CtrLoRAError(f"{name}: the file is empty (0 bytes); download or copy it again.")
    try:
        sd = comfy.utils.load_torch_file(path, safe_load=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):
            raise CtrLoRAError(
                f"{name}: refused to load: the file holds Python objects other than tensors, which could run code. "
                "Use a plain weights file (.safetensors, or a .ckpt of tensors only)."
            ) from e
        raise CtrLoRAError(f"{name}: could not be read as a .ckpt checkpoint (corrupt or truncated file?).") from e
    except Exception as e:
        raise CtrLoRAError(
            f"{name}: could not be read as a .ckpt or .safetensors checkpoint (corrupt or truncated file?): "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from e
    if not isinstance(sd, dict):
        raise CtrLoRAError(f"{name}: holds a {type(sd).__name__}, not a dict of tensors.")
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CtrLoRAError(f"{name}: holds no tensors.")
    return {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in tensors.items()}


def save_lora_file(tensors, path, metadata=None):
    """Writes a condition LoRA as ``.safetensors`` in the official key layout, atomically, on any filesystem.

    ``tensors`` uses the official key names without the ``control_model.`` prefix. Never overwrites.
    """
    out = {PREFIX + k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    text = {k: str(v) for k, v in (metadata or {}).items()}
    try:
        write_new(path, lambda temp: safetensors.torch.save_file(out, temp, metadata=text))
    except FileExistsError as e:
        raise CtrLoRAError(f"{os.path.basename(path)}: already exists; choose another output name.") from e
