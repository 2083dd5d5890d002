"""The frozen models (the SD UNet and the base ControlNet) made fit to train through, before ComfyUI loads them.

Weights a ComfyUI node created run under ``torch.inference_mode`` are inference tensors, which autograd cannot save
for the backward pass. They are replaced by normal tensors with the same values, and this happens while no ComfyUI
model holds them loaded: a model ComfyUI already moved to the GPU (or pinned, or patched with a LoRA) is unloaded
first, so ComfyUI never keeps references to parameters that are no longer the module's.
"""
import torch

import comfy.model_management


def _inference_tensors(module):
    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):
            for key, tensor in store.items():
                if tensor is not None and tensor.is_inference():
                    yield store, key, tensor


def _unload(module):
    """Unloads (and unpatches) every model ComfyUI holds loaded whose module is ``module``."""
    loaded = comfy.model_management.current_loaded_models
    for i in reversed(range(len(loaded))):
        patcher = loaded[i].model
        if patcher is not None and patcher.model is module:
            loaded[i].model_unload()
            loaded.pop(i)


def prepare_frozen(module):
    """Freezes ``module`` and replaces its inference tensors by normal copies (unloading it from ComfyUI first if it
    has any). Call it before ``load_models_gpu``; the module stays usable for inference."""
    module.requires_grad_(False)
    if next(_inference_tensors(module), None) is None:
        return
    _unload(module)
    with torch.inference_mode(False):
        for store, key, tensor in list(_inference_tensors(module)):
            copy = tensor.clone()
            store[key] = torch.nn.Parameter(copy, requires_grad=False) if isinstance(tensor, torch.nn.Parameter) \
                else copy
