"""Gradient checkpointing for the ControlNet and the frozen UNet: keep block inputs, recompute the rest in backward.

The condition's tensors are bound onto the shared base only while its forward runs (``torch.func.functional_call``),
but checkpointing recomputes blocks during backward, after the binding is gone. Each wrapped block therefore
records the tensors it ran with and binds them again for its recomputation, so the recomputed activations are
the ones of the original forward.
"""
import contextlib

import torch
import torch.utils.checkpoint


@contextlib.contextmanager
def _bound(module, tensors):
    """Sets ``module``'s parameters/buffers (dotted names) to ``tensors`` for the duration."""
    saved = []
    try:
        for name, tensor in tensors.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            store = owner._parameters if leaf in owner._parameters else owner._buffers
            saved.append((store, leaf, store[leaf]))
            store[leaf] = tensor
        yield
    finally:
        for store, leaf, original in reversed(saved):
            store[leaf] = original


def _checkpointed(module):
    forward = module.forward

    def rerun(tensors, args, kwargs):
        with _bound(module, tensors):
            return forward(*args, **kwargs)

    def checkpointed_forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        tensors = dict(module.named_parameters(remove_duplicate=False))
        tensors.update(module.named_buffers(remove_duplicate=False))
        return torch.utils.checkpoint.checkpoint(rerun, tensors, args, kwargs, use_reentrant=False)

    return checkpointed_forward


def checkpoint_targets(control_model, unet):
    """The blocks to checkpoint: the ControlNet's input and middle blocks (called as modules) and the layers of the
    UNet's middle and output blocks (ComfyUI's UNet calls those layer by layer)."""
    targets = list(control_model.input_blocks) + [control_model.middle_block]
    for block in [unet.middle_block, *unet.output_blocks]:
        if block is not None:
            targets += list(block)
    return targets


@contextlib.contextmanager
def gradient_checkpointing(modules):
    """Wraps each module's forward in non-reentrant activation checkpointing while the context is open."""
    patched = []
    try:
        for module in modules:
            if "forward" not in module.__dict__:
                module.forward = _checkpointed(module)
                patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward
