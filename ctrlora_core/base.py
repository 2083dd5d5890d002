"""The Base ControlNet: loaded once, shared by every condition that runs on it."""
import os

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.ops

from .checkpoint import is_per_condition_key, load_state_dict
from .errors import CtrLoRAError
from .model import build_from_state_dict
from .xl import checkpoint as xl_checkpoint

FAMILY_NAMES = {"sd15": "an SD1.5 CtrLoRA", "xl": "a CtrLoRA-XL (SDXL)"}  # for messages


def _is_lora_only(tensors):
    return all(is_per_condition_key(k) for k in tensors)


class BaseControlNet:
    """A ``CtrLoRAControlNet`` with its ModelPatcher, so ComfyUI loads and offloads it with the UNet."""

    family = "sd15"  # CtrLoRA-XL: xl.base.XLBaseControlNet

    def __init__(self, model, name, load_device, manual_cast_dtype, absent=()):
        self.model = model
        # Per-condition tensors the file did not have (loaded as zeros; never used at inference, where each
        # condition binds its own, but they would seed a new condition).
        self.absent = tuple(absent)
        self.name = name
        self.load_device = load_device
        self.manual_cast_dtype = manual_cast_dtype
        self.patcher = comfy.model_patcher.ModelPatcher(
            model, load_device=load_device, offload_device=comfy.model_management.unet_offload_device()
        )

    @property
    def dtype(self):
        return self.model.dtype

    @property
    def compute_dtype(self):
        return self.manual_cast_dtype or self.model.dtype


def file_family(tensors):
    """"xl" for a CtrLoRA-XL base or peft LoRA, else "sd15"."""
    return "xl" if xl_checkpoint.is_xl_file(tensors) else "sd15"


def describe_wrong_file(tensors, name, expected, family="sd15"):
    """An actionable message when a file is not the kind ``expected`` ("base" or "LoRA") or, for a LoRA, not of
    the base's ``family``; else None."""
    if any(k.startswith(("input_hint_block.", "controlnet_cond_embedding.")) for k in tensors):
        return (f"{name} is a regular ControlNet (it has a hint CNN), not a CtrLoRA {expected}. "
                "Load it with ComfyUI's 'Load ControlNet Model' node, or pick a CtrLoRA file.")
    found = file_family(tensors)
    if expected == "LoRA" and found != family:
        fix = {"sd15": "the SD1.5 base ctrlora_sd15_basecn700k.ckpt and an SD1.5 checkpoint",
               "xl": "the CtrLoRA-XL base ctrlora-xl-base.safetensors and an SDXL checkpoint"}[found]
        return (f"{name} is {FAMILY_NAMES[found]} file, but the base it is loaded onto is {FAMILY_NAMES[family]} "
                f"base. Use it with {fix}, or pick {FAMILY_NAMES[family]} LoRA.")
    if found == "xl":
        if expected == "base" and not xl_checkpoint.is_xl_base(tensors):
            return f"{name} is a CtrLoRA-XL condition LoRA, not a base ControlNet: load it with 'Load CtrLoRA'."
        return None
    if expected == "base" and _is_lora_only(tensors):
        return f"{name} is a CtrLoRA condition LoRA, not a base ControlNet: load it with 'Load CtrLoRA'."
    if expected == "LoRA" and "input_blocks.0.0.weight" in tensors:
        return f"{name} is a CtrLoRA base ControlNet, not a condition LoRA: load it with 'Load Base ControlNet'."
    return None


def load_base(path, dtype=None):
    """Loads a base ControlNet file (official .ckpt, wrapped .ckpt or .safetensors).

    The sizes come from the tensors; the attention head count comes from the UNet at sampling time.
    ``dtype`` overrides ComfyUI's choice of weight dtype for the load device.
    """
    name = os.path.basename(path)
    tensors = load_state_dict(path)
    problem = describe_wrong_file(tensors, name, "base")
    if problem is None and xl_checkpoint.is_xl_base(tensors):
        from .xl.base import xl_base_from_tensors  # xl.base builds on this module
        return xl_base_from_tensors(tensors, name, dtype)
    if problem:
        raise CtrLoRAError(problem)
    if "input_blocks.0.0.weight" not in tensors:
        raise CtrLoRAError(f"{name}: not a CtrLoRA base ControlNet (it has no control_model.input_blocks.0.0.weight).")
    # The base file's own LoRA layers belong to its pretraining tasks; official inference ignores them.
    tensors = {k: v for k, v in tensors.items() if "lora_layer" not in k}
    return base_from_tensors(tensors, name, dtype)


def base_from_tensors(tensors, name, dtype=None, build=build_from_state_dict, base_class=BaseControlNet):
    """A ``BaseControlNet`` from its tensors (keys without ``control_model.``, no ``lora_layer`` keys).

    ``dtype`` overrides ComfyUI's choice of weight dtype for the load device. CtrLoRA-XL passes its own
    ``build`` and ``base_class``.
    """
    load_device = comfy.model_management.get_torch_device()
    if dtype is None:
        weight_dtype = next(iter(tensors.values())).dtype
        dtype = comfy.model_management.unet_dtype(
            model_params=-1, supported_dtypes=[torch.float16, torch.bfloat16, torch.float32], weight_dtype=weight_dtype,
        )
    manual_cast_dtype = comfy.model_management.unet_manual_cast(dtype, load_device)
    base_ops = comfy.ops.disable_weight_init if manual_cast_dtype is None else comfy.ops.manual_cast
    model = build(tensors, dtype, comfy.model_management.unet_offload_device(), base_ops, name)
    absent = [k for k, _ in model.named_parameters() if is_per_condition_key(k) and k not in tensors]
    return base_class(model, name, load_device, manual_cast_dtype, absent)
