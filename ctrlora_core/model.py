"""The CtrLoRA ControlNet: ControlNet's copy of the SD UNet encoder, without ``input_hint_block``.

The hint *latent* goes straight into ``input_blocks.0`` (the noisy latent is not an input). The module
holds only the weights every condition shares; a condition's own tensors (its LoRA on every Linear, its
zero convs, ``middle_block_out`` and transformer norms) are bound for the duration of one forward
(see ``lora.ConditionAdapter``), so any number of conditions run on one copy of the base.
"""
import torch
import torch.nn.functional as F

import comfy.cldm.cldm
import comfy.model_detection
import comfy.ldm.modules.attention
import comfy.ops
from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

from .checkpoint import is_per_condition_key
from .errors import CtrLoRAError


def lora_operations(base_ops):
    """``base_ops`` (one of ComfyUI's op sets) with a Linear that adds a bound low-rank delta."""

    class LoRALinear(base_ops.Linear):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # Set only while a condition runs; None buffers stay out of state_dict and model management.
            self.register_buffer("lora_down", None, persistent=False)
            self.register_buffer("lora_up", None, persistent=False)

        def forward(self, x):
            down, up = self.lora_down, self.lora_up
            if down is None:
                return super().forward(x)
            down, up = down.to(x), up.to(x)
            tokens = x.numel() // x.shape[-1]
            # W x + up(down(x)) == (W + up @ down) x: take whichever costs fewer multiplies.
            if tokens * (self.in_features + self.out_features) <= self.in_features * self.out_features:
                return super().forward(x) + F.linear(F.linear(x, down), up)
            weight, bias = comfy.ops.cast_bias_weight(self, x)
            return F.linear(x, torch.addmm(weight, up, down), bias)

    class ConditionGroupNorm(base_ops.GroupNorm):
        def forward(self, x):
            if _trained_fp32(self, x):
                return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)
            return super().forward(x)

    class ConditionLayerNorm(base_ops.LayerNorm):
        def forward(self, x):
            if _trained_fp32(self, x):
                return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)
            return super().forward(x)

    class Operations(base_ops):
        Linear = LoRALinear
        GroupNorm = ConditionGroupNorm
        LayerNorm = ConditionLayerNorm

    return Operations


def _trained_fp32(norm, x):
    """A condition's norm being trained (an fp32 master bound onto a half-precision base) computes in fp32, as
    autocast runs norms on CUDA, on every device: in fp16 a weight near 1.0 could only move in steps of 2^-10."""
    return norm.weight is not None and norm.weight.dtype == torch.float32 and x.dtype != torch.float32 \
        and norm.weight.requires_grad


class CtrLoRAControlNet(comfy.cldm.cldm.ControlNet):
    def __init__(self, **config):
        # The hint block is built by the parent and dropped: CtrLoRA embeds hints with the SD VAE instead.
        super().__init__(hint_channels=3, **config)
        del self.input_hint_block

    def set_attention_heads(self, unet_config):
        """Takes the head layout from the UNet the control runs with; the weights do not record it."""
        num_heads = unet_config.get("num_heads", -1)
        head_channels = unet_config.get("num_head_channels", -1)
        for module in self.modules():
            if isinstance(module, comfy.ldm.modules.attention.CrossAttention):
                inner_dim = module.to_q.out_features
                heads = inner_dim // head_channels if head_channels not in (-1, None) else num_heads
                if heads is None or heads <= 0 or inner_dim % heads:
                    raise CtrLoRAError(
                        f"The model's attention layout (num_heads={num_heads}, num_head_channels={head_channels}) "
                        f"does not fit the base ControlNet's {inner_dim}-channel attention."
                    )
                module.heads = heads

    def forward(self, hint, timesteps, context, **kwargs):
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(hint.dtype))
        outputs = []
        h = hint
        for block, zero_conv in zip(self.input_blocks, self.zero_convs):
            h = block(h, emb, context)
            outputs.append(zero_conv(h, emb, context))
        h = self.middle_block(h, emb, context)
        return {"middle": [self.middle_block_out(h, emb, context)], "output": outputs}


def build_from_state_dict(tensors, dtype, device, base_ops, name):
    """Builds a ``CtrLoRAControlNet`` whose sizes come from the tensors' shapes and loads them into it.

    ``tensors``: the base file's tensors without ``lora_layer`` keys (keys without ``control_model.``). The
    base's own zero convs and norms are kept (they seed the training of a new condition) but never run at
    inference: each condition binds its own.
    """
    config = comfy.model_detection.detect_unet_config(tensors, "")
    if config is None or "context_dim" not in config or config.get("context_dim") is None:
        raise CtrLoRAError(f"{name}: not a CtrLoRA base ControlNet: its blocks do not form an SD UNet encoder.")
    for key in ("out_channels", "transformer_depth_output", "use_temporal_resblock", "use_temporal_attention"):
        config.pop(key, None)
    with torch.device("meta"):
        model = CtrLoRAControlNet(
            **config, num_heads=1, dtype=dtype, operations=lora_operations(base_ops),
        )
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors and not is_per_condition_key(k)]
    unexpected = [k for k in tensors if k not in expected]
    wrong = [k for k in tensors if k in expected and tensors[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys
        )
        raise CtrLoRAError(f"{name}: not a consistent CtrLoRA base ControlNet ({detail}).")
    # A base stripped of its per-condition tensors still works: those are always bound per condition.
    weights = {k: torch.zeros(v.shape, dtype=dtype, device=device) for k, v in expected.items() if k not in tensors}
    weights.update({k: v.to(device=device, dtype=dtype) for k, v in tensors.items()})
    model.load_state_dict(weights, assign=True)
    return model


def lora_linear_names(model):
    """Module paths of every Linear that carries a condition's LoRA (official: every nn.Linear)."""
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def per_condition_tensor_names(model):
    """Parameter paths of the zero convs, middle_block_out and transformer norms each condition replaces."""
    return [name for name, _ in model.named_parameters() if is_per_condition_key(name)]
