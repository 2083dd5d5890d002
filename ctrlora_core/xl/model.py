"""The CtrLoRA-XL ControlNet: ComfyUI's cldm ControlNet in the SDXL layout, with one 3x3 conv as its hint block.

The port's ControlNet is diffusers' SDXL ControlNet without the hint CNN: ``conv_in_condition`` (4 -> 320, zero
initialised) takes the condition latent and its output is added to ``conv_in(noisy latent)``, which is exactly
where cldm adds its hint block's output. So unlike SD1.5 CtrLoRA, this model sees the noisy latent, and also SDXL's
pooled text and size conditions (cldm's ``label_emb`` = diffusers' ``add_embedding``). Only to_q/to_k/to_v carry a
condition's LoRA; every other weight is shared. Diffusers names map to cldm's with ComfyUI's ``unet_to_diffusers``.
"""
import torch

import comfy.cldm.cldm
import comfy.model_detection
import comfy.utils
from comfy.ldm.modules.diffusionmodules.openaimodel import TimestepEmbedSequential
from comfy.model_detection import count_blocks

from ..errors import CtrLoRAError
from ..model import CtrLoRAControlNet, lora_operations

LORA_TARGETS = ("to_q", "to_k", "to_v")
# The ControlNet-only diffusers names and their cldm names (the rest is the SDXL UNet encoder).
_CONTROL_KEYS = {"controlnet_mid_block": "middle_block_out.0", "conv_in_condition": "input_hint_block.0"}


class XLControlNet(comfy.cldm.cldm.ControlNet):
    """cldm's ControlNet whose ``input_hint_block`` is the port's single conv; cldm's forward adds its output
    after ``input_blocks.0`` (conv_in), as the port does."""

    def __init__(self, **config):
        super().__init__(hint_channels=config["in_channels"], **config)
        conv = config["operations"].conv_nd(2, config["in_channels"], config["model_channels"], 3, padding=1,
                                            dtype=config.get("dtype"), device=config.get("device"))
        self.input_hint_block = TimestepEmbedSequential(conv)
        self.lora_modules = {}  # diffusers module name -> module path here, for every LoRA target

    # The head count is not in the weights either: take it from the UNet at sampling time, as SD1.5 does.
    set_attention_heads = CtrLoRAControlNet.set_attention_heads


def _block_counts(weights):
    """What ``unet_to_diffusers`` needs, counted from the diffusers names (any size: SDXL or a tiny one)."""
    model_channels = weights["conv_in.weight"].shape[0]
    num_res_blocks, channel_mult, transformer_depth = [], [], []
    for level in range(count_blocks(weights, "down_blocks.{}.")):
        resnets = count_blocks(weights, f"down_blocks.{level}.resnets.{{}}.")
        num_res_blocks.append(resnets)
        channel_mult.append(weights[f"down_blocks.{level}.resnets.0.conv1.weight"].shape[0] // model_channels)
        transformer_depth += [count_blocks(weights, f"down_blocks.{level}.attentions.{i}.transformer_blocks.{{}}.")
                              for i in range(resnets)]
    return {"num_res_blocks": num_res_blocks, "channel_mult": channel_mult, "transformer_depth": transformer_depth,
            "transformer_depth_middle": count_blocks(weights, "mid_block.attentions.0.transformer_blocks.{}."),
            "transformer_depth_output": [0] * sum(n + 1 for n in num_res_blocks)}


def diffusers_to_cldm(weights, name):
    """``{diffusers ControlNet name: cldm name}`` for every tensor of ``weights``; unknown names are refused."""
    key_map = comfy.utils.unet_to_diffusers(_block_counts(weights))
    for key in weights:
        module, _, attr = key.rpartition(".")
        if module in _CONTROL_KEYS:
            key_map[key] = f"{_CONTROL_KEYS[module]}.{attr}"
        elif module.startswith("controlnet_down_blocks."):
            key_map[key] = f"zero_convs.{module.rpartition('.')[2]}.0.{attr}"
    unknown = [k for k in weights if k not in key_map]
    if unknown:
        raise CtrLoRAError(f"{name}: not a CtrLoRA-XL base ControlNet: unknown tensors {', '.join(unknown[:3])}"
                           f"{' ...' if len(unknown) > 3 else ''}.")
    return {k: key_map[k] for k in weights}


def build_from_state_dict(weights, dtype, device, base_ops, name):
    """An ``XLControlNet`` sized by the tensors' shapes, holding them.

    ``weights``: the base file's shared tensors under diffusers names (``.base_layer.`` removed, no LoRA keys).
    """
    if "conv_in.weight" not in weights or "controlnet_down_blocks.0.weight" not in weights:
        raise CtrLoRAError(f"{name}: not a CtrLoRA-XL base ControlNet (no conv_in or controlnet_down_blocks).")
    names = diffusers_to_cldm(weights, name)
    tensors = {names[k]: v for k, v in weights.items()}
    config = comfy.model_detection.detect_unet_config(tensors, "")
    if config is None or config.get("context_dim") is None:
        raise CtrLoRAError(f"{name}: not a CtrLoRA-XL base ControlNet: its blocks do not form an SDXL UNet encoder.")
    for key in ("out_channels", "transformer_depth_output", "use_temporal_resblock", "use_temporal_attention"):
        config.pop(key, None)
    config.update(num_heads=1, num_head_channels=-1, dtype=dtype, operations=lora_operations(base_ops))
    with torch.device("meta"):
        model = XLControlNet(**config)
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    wrong = [f"{k} {tuple(tensors[k].shape)} (expected {tuple(expected[k].shape)})"
             for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    unexpected = [k for k in tensors if k not in expected]
    if missing or wrong or unexpected:
        detail = "; ".join(f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}" for label, keys in
                           (("missing", missing), ("wrong shape", wrong), ("unexpected", unexpected)) if keys)
        raise CtrLoRAError(f"{name}: not a consistent CtrLoRA-XL base ControlNet ({detail}).")
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}, assign=True)
    model.lora_modules = {k[:-len(".weight")]: names[k][:-len(".weight")] for k in weights
                          if k.rsplit(".", 2)[-2] in LORA_TARGETS}
    return model
