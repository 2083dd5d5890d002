"""A condition: one LoRA file's tensors, bound onto the shared base for each forward.

Official semantics (``cldm/lora.py``): every nn.Linear of the ControlNet gets ``y = W x + b + up(down(x))``
(no alpha, no rank scaling), and each condition also replaces the zero convs, ``middle_block_out`` and the
transformer norms with its own.
"""
import os

import torch

import comfy.model_management
import comfy.model_patcher

from .base import describe_wrong_file
from .checkpoint import load_state_dict
from .errors import CtrLoRAError
from .model import lora_linear_names, per_condition_tensor_names

_FILE_SUFFIX = {"lora_down": "lora_layer.down.weight", "lora_up": "lora_layer.up.weight"}


def file_key(binding_name):
    """``x.lora_down`` -> ``x.lora_layer.down.weight`` (official key, without ``control_model.``)."""
    module, _, attr = binding_name.rpartition(".")
    return f"{module}.{_FILE_SUFFIX[attr]}" if attr in _FILE_SUFFIX else binding_name


def expected_shapes(model, rank):
    """Official LoRA-file key -> shape, for a condition of ``rank`` on ``model``."""
    shapes = {}
    for name in lora_linear_names(model):
        linear = model.get_submodule(name)
        shapes[file_key(f"{name}.lora_down")] = (rank, linear.in_features)
        shapes[file_key(f"{name}.lora_up")] = (linear.out_features, rank)
    for name in per_condition_tensor_names(model):
        shapes[name] = tuple(model.get_parameter(name).shape)
    return shapes


def binding_names(model):
    """Names the condition's tensors bind to on ``model``, in a fixed order."""
    names = [f"{n}.{attr}" for n in lora_linear_names(model) for attr in _FILE_SUFFIX]
    return names + per_condition_tensor_names(model)


class ConditionAdapter(torch.nn.Module):
    """One condition's tensors as parameters, keyed by the base module paths they bind to."""

    def __init__(self, tensors, rank):
        super().__init__()
        self.names = list(tensors)
        self.rank = rank
        self.tensors = torch.nn.ParameterList(torch.nn.Parameter(t, requires_grad=False) for t in tensors.values())

    def bindings(self, device, dtype):
        """The tensors to bind, on ``device``. Frozen ones in ``dtype`` (the base's); trained ones (requires_grad) as
        they are, fp32 masters that autocast casts per op, so small updates are never rounded to the base's dtype."""
        return {n: t.to(device=device, dtype=t.dtype if t.requires_grad else dtype)
                for n, t in zip(self.names, self.tensors)}

    def frozen_copy(self, dtype, device=None):
        """A detached copy for inference (e.g. of a condition being trained), in ``dtype`` on ``device``."""
        return ConditionAdapter({n: t.detach().to(device=device, dtype=dtype).clone()
                                 for n, t in zip(self.names, self.tensors)}, self.rank)

    def file_tensors(self):
        """The tensors under their official key names (without ``control_model.``)."""
        return {file_key(n): t for n, t in zip(self.names, self.tensors)}

    @classmethod
    def from_file_tensors(cls, tensors, model, name):
        """Checks that a LoRA file fits ``model`` and maps it onto the base's module paths."""
        problem = describe_wrong_file(tensors, name, "LoRA")
        if problem:
            raise CtrLoRAError(problem)
        downs = [v for k, v in tensors.items() if k.endswith("lora_layer.down.weight")]
        if not downs:
            raise CtrLoRAError(f"{name}: not a CtrLoRA condition LoRA (it has no lora_layer tensors).")
        rank = downs[0].shape[0]
        expected = expected_shapes(model, rank)
        missing = [k for k in expected if k not in tensors]
        unexpected = [k for k in tensors if k not in expected]
        wrong = [f"{k} {tuple(tensors[k].shape)} (base expects {expected[k]})"
                 for k in expected if k in tensors and tuple(tensors[k].shape) != expected[k]]
        if missing or unexpected or wrong:
            detail = "; ".join(
                f"{label}: {', '.join(keys[:2])}{' ...' if len(keys) > 2 else ''}"
                for label, keys in (("wrong shape", wrong), ("missing", missing), ("unexpected", unexpected)) if keys
            )
            raise CtrLoRAError(
                f"{name} does not fit this base ControlNet (made for another base size or with mixed ranks; "
                f"rank {rank} read from the file): {detail}"
            )
        return cls({n: tensors[file_key(n)] for n in binding_names(model)}, rank)

    @classmethod
    def fresh(cls, model, rank, generator=None):
        """A new condition for training (official init): down ~ N(0, 1/rank), up = 0, and the zero convs and
        norms copied from the base."""
        tensors = {}
        for name in binding_names(model):
            module, _, attr = name.rpartition(".")
            if attr == "lora_down":
                linear = model.get_submodule(module)
                tensors[name] = torch.randn(rank, linear.in_features, generator=generator) / rank
            elif attr == "lora_up":
                tensors[name] = torch.zeros(model.get_submodule(module).out_features, rank)
            else:
                tensors[name] = model.get_parameter(name).detach().to("cpu", torch.float32).clone()
        return cls(tensors, rank)


class Condition:
    """What 'Load CtrLoRA' returns: a shared base plus one condition's adapter."""

    def __init__(self, base, adapter, name):
        self.base = base
        self.adapter = adapter
        self.name = name
        self.patcher = comfy.model_patcher.ModelPatcher(
            adapter, load_device=base.load_device, offload_device=comfy.model_management.unet_offload_device()
        )

    def __call__(self, hint, timesteps, context):
        """Raw control outputs ``{"output": [...], "middle": [...]}`` of this condition (no strength)."""
        model = self.base.model
        bindings = self.adapter.bindings(hint.device, self.base.dtype)
        return torch.func.functional_call(model, bindings, (hint, timesteps, context), strict=False)


def load_condition(base, path):
    name = os.path.basename(path)
    tensors = load_state_dict(path)
    adapter = ConditionAdapter.from_file_tensors(tensors, base.model, name)
    adapter.to(dtype=base.dtype)
    return Condition(base, adapter, name)
