"""A CtrLoRA-XL condition: one peft adapter on the base's attention projections, bound for each forward.

The port's semantics (peft LoRA on to_q, to_k, to_v of self- and cross-attention, nothing else per condition):
``y = W x + scale * B (A x)`` with ``scale = lora_alpha / r``. The scale is folded into the bound up matrix, so
the condition runs through the same LoRA Linear and binding as SD1.5 (``lora.ConditionAdapter``).
"""
import functools
import os

import torch

from ..base import describe_wrong_file
from ..checkpoint import load_state_dict
from ..errors import CtrLoRAError
from ..lora import Condition, ConditionAdapter
from .checkpoint import adapter_keys, embedded_adapters, lora_pairs, lora_scale, read_keys, read_tensors


class XLCondition(Condition):
    def __call__(self, x, hint, timesteps, context, y):
        """Raw control outputs ``{"output": [...], "middle": [...]}`` of this condition (no strength)."""
        bindings = self.adapter.bindings(x.device, self.base.dtype)
        return torch.func.functional_call(self.base.model, bindings, (x, hint, timesteps, context), {"y": y},
                                          strict=False)


def adapter_from_pairs(pairs, scale, model, name):
    """Checks that one adapter's ``{diffusers module: (A, B)}`` fits ``model`` and binds it to its modules."""
    targets = model.lora_modules
    incomplete = [m for m, (down, up) in pairs.items() if down is None or up is None]
    missing = [m for m in targets if m not in pairs]
    unexpected = [m for m in pairs if m not in targets]
    if incomplete or missing or unexpected:
        detail = "; ".join(f"{label}: {', '.join(keys[:2])}{' ...' if len(keys) > 2 else ''}" for label, keys in
                           (("missing", missing), ("unexpected", unexpected), ("lora_A or lora_B missing", incomplete))
                           if keys)
        raise CtrLoRAError(f"{name} does not fit this CtrLoRA-XL base (it should have a LoRA on every to_q, to_k "
                           f"and to_v of the base's attention, and nothing else): {detail}")
    rank = next(iter(pairs.values()))[0].shape[0]
    tensors = {}
    for module, path in targets.items():
        down, up = pairs[module]
        linear = model.get_submodule(path)
        if tuple(down.shape) != (rank, linear.in_features) or tuple(up.shape) != (linear.out_features, rank):
            raise CtrLoRAError(
                f"{name} does not fit this CtrLoRA-XL base (made for another base size, or with mixed ranks; rank "
                f"{rank} read from the file): {module} has lora_A {tuple(down.shape)} and lora_B {tuple(up.shape)}, "
                f"the base expects ({rank}, {linear.in_features}) and ({linear.out_features}, {rank}).")
        tensors[f"{path}.lora_down"] = down
        tensors[f"{path}.lora_up"] = up * scale
    return ConditionAdapter(tensors, rank)


def _choose_adapter(pairs, name, adapter):
    if adapter is not None:
        if adapter not in pairs:
            raise CtrLoRAError(f"{name}: the file has no adapter '{adapter}' (it has: "
                               f"{', '.join(sorted(a for a in pairs if a)) or 'none'}).")
        return pairs[adapter]
    if None in pairs:  # PeftModel.save_pretrained's adapter-only form
        return pairs[None]
    if len(pairs) == 1:
        return next(iter(pairs.values()))
    raise CtrLoRAError(f"{name} holds several adapters ({', '.join(sorted(pairs))}); pick one in Load CtrLoRA as "
                       f"'{name}:<adapter>'.")


def load_xl_condition(base, path, adapter=None):
    """A condition from a peft LoRA file, or from the adapter named ``adapter`` that a (base) file embeds."""
    name = os.path.basename(path) + (f":{adapter}" if adapter else "")
    keys = read_keys(path) if adapter else None
    if keys is not None:  # read only this adapter's tensors, not the whole base
        wanted = adapter_keys(keys, adapter)
        if not wanted:
            raise CtrLoRAError(f"{os.path.basename(path)} has no adapter '{adapter}' (it has: "
                               f"{', '.join(embedded_adapters(keys)) or 'none'}).")
        tensors = read_tensors(path, wanted)
    else:
        tensors = load_state_dict(path)
    problem = describe_wrong_file(tensors, os.path.basename(path), "LoRA", family=base.family)
    if problem:
        raise CtrLoRAError(problem)
    pairs = lora_pairs(tensors)
    if not pairs:
        raise CtrLoRAError(f"{name}: not a CtrLoRA-XL condition LoRA (it has no lora_A/lora_B tensors).")
    result = adapter_from_pairs(_choose_adapter(pairs, name, adapter), lora_scale(path), base.model, name)
    result.to(dtype=base.dtype)
    return XLCondition(base, result, name)


def list_embedded(path):
    """``<file name>:<adapter>`` for each base-condition adapter a ``.safetensors`` base file embeds."""
    stat = os.stat(path)
    return [f"{os.path.basename(path)}:{a}" for a in _embedded(path, stat.st_mtime_ns, stat.st_size)]


@functools.lru_cache(maxsize=256)
def _embedded(path, mtime_ns, size):
    """Read once per file version: ComfyUI lists the choices on every page load."""
    return embedded_adapters(read_keys(path) or [])
